"""The test-time baselines an APM evaluation is compared with, on the same teacher and views.

Each method maps a batch of the pipeline (the teacher's embedding of every image, and of its
augmented views when the method needs them) to class logits; the pipeline
(``apm_fast.classify.iter_classify``) computes the teacher's embeddings once and shares them.

* :class:`ZeroShot`: logits = 100 cos(image, class text) (one prompt, or a template ensemble).
* :class:`Zero` (Farina et al. 2024, "Frustratingly easy test-time adaptation of VLMs"): keep the
  ``keep`` most confident views (lowest prediction entropy), each votes its argmax class (the
  softmax at temperature zero), predict the majority; no backward pass.
* :class:`TPT` (Shu et al. 2022, "Test-time prompt tuning"): 4 context token embeddings,
  initialized from "a photo of a", are tuned for each image by one AdamW step (lr 5e-3) that
  minimizes the entropy of the averaged prediction of the ``keep`` most confident views, through
  the teacher's text tower; the original image is then classified with the tuned prompt and the
  context is reset for the next image.

Views (:class:`Views`): the image itself plus ``n - 1`` augmented views, random resized crops
(and horizontal flips) for ImageNet-like sets, AugMix on top for the fine-grained sets, as TPT's
harness does; drawn from a generator seeded by the image's position, so a resumed run sees the same
views. They are made in the loader's workers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LOGIT_SCALE", "ZeroShot", "Zero", "TPT", "Views", "select_confident", "entropy"]

LOGIT_SCALE = 100.0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def select_confident(logits: torch.Tensor, keep: float) -> torch.Tensor:
    """The rows of ``logits`` (V x C) with the lowest entropy: ``int(V * keep)`` of them (at least
    one), most confident first (TPT's and ZERO's confidence selection)."""
    k = max(1, int(logits.shape[0] * keep))
    return logits[entropy(logits).argsort()[:k]]


class ZeroShot:
    """Class logits of the teacher's image embedding against fixed class texts."""

    needs_views = False

    def __init__(self, name: str, text: torch.Tensor):
        self.name, self.text = name, text

    def __call__(self, targets, views=None):
        return LOGIT_SCALE * F.normalize(targets.float(), dim=-1) @ self.text.t()


class Zero:
    """ZERO: the majority vote of the most confident views' argmax classes.

    Returned "logits" are log vote counts (log 0 = -inf, so the softmax is the vote share);
    ties between classes with the same number of votes go to the one whose kept views gave it
    the higher mean probability."""

    needs_views = True

    def __init__(self, name: str, text: torch.Tensor, keep: float = 0.1):
        self.name, self.text, self.keep = name, text, keep

    def __call__(self, targets, views):
        out = []
        for v in views:                                           # V x D per image
            logits = LOGIT_SCALE * F.normalize(v.float(), dim=-1) @ self.text.t()
            kept = select_confident(logits, self.keep)
            votes = torch.bincount(kept.argmax(-1), minlength=logits.shape[-1]).float()
            tie = kept.softmax(-1).mean(0) * 1e-3                  # < 1 vote: only breaks ties
            out.append(torch.log(votes + tie * (votes > 0)))
        return torch.stack(out)


class _CtxEmbedding(nn.Module):
    """The text tower's token embedding with positions 1..n replaced by learnable vectors."""

    def __init__(self, base: nn.Module, ctx: torch.Tensor):
        super().__init__()
        self.base, self.ctx = base, ctx

    def forward(self, tokens):
        x = self.base(tokens)
        n = self.ctx.shape[0]
        return torch.cat([x[:, :1], self.ctx.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)


class TPT:
    """Test-time prompt tuning through an open_clip teacher's text tower (see the module docstring).

    teacher: an ``apm_fast.teachers.OpenCLIPTeacher`` (its ``model`` and ``tokenizer``);
    classnames: the class names (label order); steps: AdamW steps per image (TPT: 1); lr: 5e-3;
    keep: the fraction of views kept (TPT: 0.1); init: the context's initial words."""

    needs_views = True

    def __init__(self, name: str, teacher, classnames: Sequence[str], *, steps: int = 1, lr: float = 5e-3,
                 keep: float = 0.1, init: str = "a photo of a"):
        self.name, self.teacher, self.keep, self.steps, self.lr = name, teacher, keep, steps, lr
        model = teacher.model
        if not hasattr(model, "token_embedding"):
            raise ValueError(f"tpt: teacher {teacher.name} has no open_clip text tower with token embeddings")
        n = len(teacher.tokenizer([init])[0].nonzero()) - 2        # words of init, without SOT/EOT
        self.n_ctx = n
        prompts = [f"{init} {c}." for c in classnames]
        self.tokens = teacher.tokenizer(prompts).to(teacher.device)
        with torch.no_grad():
            emb = model.token_embedding(self.tokens[:1])[0]
        self.ctx0 = emb[1:1 + n].detach().float().clone()         # "a photo of a": the reset point

    def _text(self, ctx):
        """C x D normalized class embeddings with the context ``ctx`` (differentiable in ctx)."""
        model = self.teacher.model
        base = model.token_embedding
        model.token_embedding = _CtxEmbedding(base, ctx)
        try:
            return F.normalize(model.encode_text(self.tokens).float(), dim=-1)
        finally:
            model.token_embedding = base

    def __call__(self, targets, views):
        out = []
        for target, v in zip(targets, views):
            ctx = nn.Parameter(self.ctx0.clone())                  # reset per image
            opt = torch.optim.AdamW([ctx], lr=self.lr)
            feats = F.normalize(v.float(), dim=-1)                 # V x D, fixed
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = LOGIT_SCALE * feats @ self._text(ctx).t()
                    kept = select_confident(logits, self.keep)
                    avg = kept.log_softmax(-1).logsumexp(0) - math.log(kept.shape[0])   # log mean prob
                    loss = -(avg.exp() * avg).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                out.append(LOGIT_SCALE * F.normalize(target.float(), dim=-1) @ self._text(ctx).t())
        return torch.stack(out)


class Views:
    """``n - 1`` augmented views of a PIL image as a tensor (n - 1) x 3 x s x s in the teacher's
    normalization (the original, view 0, is the teacher's own preprocessing, made by the
    pipeline); picklable for the loader's workers."""

    def __init__(self, n: int, size: int, mean, std, *, augmix: bool = False, seed: int = 0):
        if n < 2:
            raise ValueError(f"views: expected at least 2 (the image and one augmented view), got {n}")
        self.n, self.size, self.mean, self.std, self.augmix, self.seed = n, size, mean, std, augmix, seed

    def __call__(self, img, index: int) -> torch.Tensor:
        import torchvision.transforms as T

        ops = [T.RandomResizedCrop(self.size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
        if self.augmix:
            ops.append(T.AugMix())
        aug = T.Compose(ops + [T.ToTensor(), T.Normalize(self.mean, self.std)])
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + index)          # the same views on a rerun
        try:
            return torch.stack([aug(img) for _ in range(self.n - 1)])
        finally:
            torch.random.set_rng_state(state)

    @classmethod
    def for_teacher(cls, teacher, n: int, *, augmix: bool = False, seed: int = 0) -> Optional["Views"]:
        """Views in the normalization of ``teacher``'s own preprocessing (its Normalize step)."""
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        for t in getattr(getattr(teacher, "_preprocess", None), "transforms", []):
            if type(t).__name__ == "Normalize":
                mean, std = tuple(t.mean), tuple(t.std)
        return cls(n, teacher.image_size, mean, std, augmix=augmix, seed=seed)
