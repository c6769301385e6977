"""The steering widget's callbacks in a plain Python process (no browser): set values, click."""

from __future__ import annotations

from sae_nb.effects import generate
from sae_nb.intervene import ablate
from sae_nb.steering import latent_method
from sae_nb.steering_widget import SteeringWidget
from test_intervene import PROMPT, topk


def test_generate_shows_clean_and_steered_text_and_tables(llama):
    sae = topk()
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=3, coefficient=0.0, scale=5.0,
                       max_new_tokens=6, n_attributed=4)
    w.generate_button.click()
    assert w.clean_text == w.steered_text  # coefficient 0
    assert w.clean_text == generate(llama, PROMPT, max_new_tokens=6)[0]
    w.coefficient.value = 1.0
    w.generate_button.click()
    expected = generate(llama, PROMPT, sae, latent_method(sae, 3, 5.0).edits(1.0),
                        max_new_tokens=6)[0]
    assert w.steered_text == expected and w.steered_text != w.clean_text
    assert "promoted" in w.logits.value and "suppressed" in w.logits.value
    assert len(w.attributed.children) == 4
    first = w.top.iloc[0]
    w.attributed.children[0].children[0].click()  # ablate the top attributed latent
    text = generate(llama, PROMPT, sae, [ablate(int(first.latent), int(first.position),
                                                int(first.position) + 1)], max_new_tokens=6)[0]
    assert f"latent {first.latent} ablated at position {first.position}" in w.ablation.value
    import html
    assert html.escape(text) in w.ablation.value


def test_an_empty_prompt_is_reported_in_the_widget(llama):
    w = SteeringWidget(llama, topk(), prompt="", scale=1.0)
    w.generate_button.click()
    assert "empty" in w.status.value and w.texts.value == ""
