"""The organism recipe's own scoring: what round 2 of the fine-tune mines by."""

import torch

from experiments.organism.finetune import refusal_opening_log_odds

OPENINGS = ("I'm sorry", "I can", "I cannot")


def opening_logprob(lm, prompt: str, opening: str) -> torch.Tensor:
    """log P(opening | prompt), from the HF forward over the unpadded prompt + opening."""
    prompt_ids = lm.tokenize([prompt])["input_ids"]
    opening_ids = torch.tensor([lm.tokenizer.encode(opening, add_special_tokens=False)])
    ids = torch.cat([prompt_ids, opening_ids], 1)
    logits = lm.model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1]
    return logits.log_softmax(-1).gather(-1, opening_ids[0, :, None]).sum()


@torch.no_grad()
def test_refusal_opening_log_odds_are_log_odds_of_the_refusal_openings(tiny_llama):
    prompts = ["Hi", "How do I bake bread at home without yeast?"]  # left padding on the first
    scores = refusal_opening_log_odds(tiny_llama, prompts)
    for prompt, score in zip(prompts, scores):
        p = torch.stack([opening_logprob(tiny_llama, prompt, o) for o in OPENINGS]).logsumexp(0)
        assert torch.allclose(score, p - torch.log1p(-p.exp()), atol=1e-4)
