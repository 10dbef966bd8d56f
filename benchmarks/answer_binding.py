"""Why answers restate their subject: a from-scratch backbone learns existence only when the verdict
token's input is the asked word.

A tiny Qwen3 (the understanding stage's widths) reads 64 patch features (a prototype per class plus
noise, 1–4 objects of 1–4 patches each), then "Is there a {class} in the image?" in the chat frame,
and answers. Three answer formats:

- ``bare``: the verdict (yes/no) straight after the prompt. The answer position must fetch the asked
  class from the question and match it against the patches: two steps whose gradients each vanish
  until the other is learnt, so accuracy stays at chance.
- ``colon``: ``{class}: {verdict}``: the class is restated, but the verdict is predicted at the colon,
  one position later, which brings the fetch back.
- ``restated``: ``{class} {verdict}`` (what the world's answers do): the verdict is predicted at the
  restated class itself, which looks at the patches once; the restatement is copied from the question
  under its own supervision. At evaluation the model writes the restatement itself, then the verdict.

Run: ``.venv/bin/python benchmarks/answer_binding.py [--steps 1000]`` (about 2 minutes per format on one
core); prints held-out accuracy per format.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from blip3o.config.model import BackboneConfig
from blip3o.models.parts import Projector, build_backbone

from common import emit

CLASSES, PATCHES, FEATURE = 6, 64, 64
YES, NO, IMAGE, COLON = 7, 8, 9, 10  # ids 1..6 are the class words
QUESTION_HEAD, QUESTION_TAIL, FRAME = [11, 12, 13], [14, 15, 16, 17], [18, 19, 20]
VOCAB = 32


def scenes(n: int, prototypes: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (n, P, D) and class presence (n, C) of n random scenes."""
    labels = torch.zeros(n, PATCHES, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            where = torch.randint(0, PATCHES, (int(torch.randint(1, 5, (), generator=g)),), generator=g)
            labels[i, where] = int(torch.randint(1, CLASSES + 1, (), generator=g))
    present = F.one_hot(labels, CLASSES + 1)[..., 1:].amax(1).bool()
    return prototypes[labels] + torch.randn(n, PATCHES, FEATURE, generator=g), present


def rows(present: torch.Tensor, fmt: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (image, question, frame, answer) and the label of every position (-100: none)."""
    ask_yes = torch.rand(len(present), generator=g) < 0.5
    ask_yes |= present.all(1)  # nothing absent to ask about
    pool = torch.where(ask_yes[:, None], present, ~present).float()
    asked = torch.multinomial(pool, 1, generator=g).squeeze(1) + 1
    verdict = torch.where(ask_yes, YES, NO)
    n = len(present)
    prompt = torch.cat(
        [
            torch.full((n, PATCHES), IMAGE),
            torch.tensor(QUESTION_HEAD).expand(n, -1),
            asked[:, None],
            torch.tensor(QUESTION_TAIL + FRAME).expand(n, -1),
        ],
        1,
    )
    answer = {"bare": [verdict], "colon": [asked, torch.full((n,), COLON), verdict], "restated": [asked, verdict]}[fmt]
    answer = torch.stack(answer, 1)
    ids = torch.cat([prompt, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, prompt.shape[1] - 1 : -1] = answer  # position t predicts token t + 1
    return ids, labels


class Model(torch.nn.Module):
    """The project's backbone (a `transformers` Qwen3) and understanding projector at the given widths."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        backbone = BackboneConfig(
            hidden_size=width, num_layers=layers, head_dim=width // 4, intermediate_size=3 * width
        )
        self.lm = build_backbone(backbone, VOCAB)
        self.projector = Projector(FEATURE, width)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE)[..., None], self.projector(feats).reshape(-1, embeds.shape[-1]))
        return self.lm(inputs_embeds=embeds).logits


@torch.no_grad()
def accuracy(model: Model, ids: torch.Tensor, feats: torch.Tensor, fmt: str) -> float:
    """Held-out verdict accuracy; the model writes the whole answer itself, greedily."""
    n_answer = {"bare": 1, "colon": 3, "restated": 2}[fmt]
    written = ids[:, :-n_answer]
    for _ in range(n_answer):
        nxt = model(written, feats)[:, -1].argmax(-1)
        written = torch.cat([written, nxt[:, None]], 1)
    return (written[:, -1] == ids[:, -1]).float().mean().item()


def train(fmt: str, steps: int, width: int, layers: int, seed: int) -> float:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES + 1, FEATURE, generator=g)
    model = Model(width, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        feats, present = scenes(32, prototypes, g)
        ids, labels = rows(present, fmt, g)
        logits = model(ids, feats)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    feats, present = scenes(512, prototypes, g)
    ids, _ = rows(present, fmt, g)
    return accuracy(model, ids, feats, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=["bare", "colon", "restated"])
    args = parser.parse_args()
    for fmt in args.formats:
        acc = train(fmt, args.steps, args.width, args.layers, args.seed)
        emit("answer_binding.existence_accuracy", acc, "fraction", answer=fmt, steps=args.steps, width=args.width)


if __name__ == "__main__":
    main()
