"""Benchmark: attribution against per-latent ablations, and steered against clean generation.

On the default model and the shipped dictionary (``resid_out_layer6`` of SmolLM2-135M, 4608
TopK latents):

1. Attribution of a logit difference (the clean model's top next token minus its second) to
   every latent at every position of a 64-token corpus context, one forward and one backward
   pass (``sae_nb.interventions.attribution.attribute``), against the naive alternative: one
   ablation forward pass per latent active anywhere in the prompt. The ratio of the two times is
   printed (goal >= 50x), with the correlation between the attributions summed over positions
   and the measured ablation effects.
2. Time per generated token (greedy, KV cache) clean, steering one latent (``f_i += alpha``,
   no encoding needed) and ablating one (the dictionary encodes every step); goal < 1.3x.

    python benchmarks/bench_intervene.py                 # every active latent ablated
    python benchmarks/bench_intervene.py --sample 100    # time 100 ablations, extrapolate
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sae_nb
from sae_nb.interventions.attribution import ablation_effect, attribute, target_function
from sae_nb.interventions.effects import neutral_tokens, time_per_token
from sae_nb.interventions.splice import ablate, edited_logits, steer_latent

PROMPT = "The President said that the nation"
ATTRIBUTION_GOAL, GENERATION_GOAL = 50.0, 1.3


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_attribution(lm, sae, ctx_len: int, sample: int) -> None:
    ids = neutral_tokens(lm, n_contexts=1, ctx_len=ctx_len, seed=3)[0]
    top2 = edited_logits(lm, ids[None])[0, -1].topk(2).indices.tolist()
    target = tuple(top2)  # logit of the top next token minus the second
    fn, _ = target_function(lm, target)
    attribute(lm, sae, ids, target)  # warm-up
    t_att = [timed(lambda: attribute(lm, sae, ids, target))[1] for _ in range(5)]
    att = attribute(lm, sae, ids, target)
    active = (att.codes != 0).any(0).nonzero()[:, 0].tolist()
    picked = active if sample <= 0 else active[:: max(1, len(active) // sample)][:sample]
    effects, t_abl = [], []
    for latent in picked:  # the naive way: one ablation forward pass per latent
        effect, seconds = timed(lambda latent=latent: ablation_effect(lm, sae, ids[None], fn,
                                                                      latent, None, att.target))
        effects.append(effect)
        t_abl.append(seconds)
    t_att, t_one = float(np.median(t_att)), float(np.median(t_abl))
    t_naive = t_one * len(active)
    ratio = t_naive / t_att
    r = float(np.corrcoef(att.per_latent()[picked].numpy(), effects)[0, 1])
    print(f"prompt: {ctx_len} tokens, target {att.target_name} = {att.target:.3f}")
    print(f"attribution, all {sae.d_sae} latents x {ctx_len} positions: {t_att * 1000:8.1f} ms "
          f"median of 5 (one forward + one backward)")
    how = "all measured" if len(picked) == len(active) else f"{len(picked)} measured"
    print(f"naive: one ablation forward per active latent: {len(active)} x {t_one * 1000:.1f} ms "
          f"(median, {how}) = {t_naive:8.2f} s")
    verdict = "meets" if ratio >= ATTRIBUTION_GOAL else "MISSES"
    print(f"ratio naive / attribution: {ratio:8.1f}x  ({verdict} the {ATTRIBUTION_GOAL:.0f}x goal)")
    print(f"attribution summed over positions vs measured ablation effect, {len(picked)} latents:"
          f" Pearson r = {r:.3f}")


def bench_generation(lm, sae, n_tokens: int, rounds: int = 5) -> None:
    """Best of ``rounds`` per setting, the settings interleaved round by round so that a busy
    spell of a shared machine does not land on one of them only."""
    settings = {"clean": (None, []),
                "steer one latent (alpha 8)": (sae, [steer_latent(100, 8.0)]),
                "ablate one latent (encodes)": (sae, [ablate(100)])}
    time_per_token(lm, PROMPT, max_new_tokens=4, repeats=1)  # warm-up
    best = dict.fromkeys(settings, float("inf"))
    for _ in range(rounds):
        for name, (dictionary, edits) in settings.items():
            t = time_per_token(lm, PROMPT, dictionary, edits, max_new_tokens=n_tokens, repeats=1)
            best[name] = min(best[name], t)
    clean = best.pop("clean")
    for name, edited in best.items():
        ratio = edited / clean
        verdict = "meets" if ratio < GENERATION_GOAL else "MISSES"
        print(f"generation, {name:<28}: {edited * 1000:7.2f} ms/token vs clean "
              f"{clean * 1000:7.2f} ms/token = {ratio:.3f}x ({verdict} the < "
              f"{GENERATION_GOAL}x goal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx-len", type=int, default=64)
    parser.add_argument("--sample", type=int, default=0,
                        help="ablations to time (0: every active latent)")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    lm = sae_nb.load_model(device=args.device)
    device = next(sae_nb.activations.models.hf_model(lm).parameters()).device
    sae = sae_nb.load_default_dictionary().to(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    bench_attribution(lm, sae, args.ctx_len, args.sample)
    bench_generation(lm, sae, args.gen_tokens)


if __name__ == "__main__":
    main()
