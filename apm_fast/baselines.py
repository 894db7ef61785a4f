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
(and horizontal flips) for ImageNet-like sets, TPT's AugMix on top for the fine-grained sets, as
TPT's harness does; drawn from generators seeded by the image's index in its dataset, so a resumed
run sees the same views. They are made in the loader's workers.
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


def confidence_order(logits: torch.Tensor, keep: float):
    """(kept, rest): the row indices of ``logits`` (V x C) by increasing entropy, split after the
    ``int(V * keep)`` most confident (at least one): TPT's and ZERO's confidence selection."""
    k = max(1, int(logits.shape[0] * keep))
    order = entropy(logits).argsort()
    return order[:k], order[k:]


def select_confident(logits: torch.Tensor, keep: float) -> torch.Tensor:
    """The rows of ``logits`` (V x C) with the lowest entropy: ``int(V * keep)`` of them (at least
    one), most confident first (:func:`confidence_order`)."""
    return logits[confidence_order(logits, keep)[0]]


class ZeroShot:
    """Class logits of the teacher's image embedding against fixed class texts."""

    needs_views = False

    def __init__(self, name: str, text: torch.Tensor):
        self.name, self.text = name, text

    def __call__(self, targets, views=None):
        return LOGIT_SCALE * F.normalize(targets.float(), dim=-1) @ self.text.t()


class Zero:
    """ZERO: the majority vote of the most confident views' argmax classes.

    Returned "logits" are log vote counts (log 0 = -inf, so the softmax is the vote share, within
    1e-3). A tie between classes with the same number of votes is broken as ZERO's harness does:
    by the next most confident of the views not kept whose argmax is one of the tied classes; if
    none, by the tied class with the highest logit in the first view not kept (the last kept
    view where every view is kept). The winner gets 1e-3 of a vote more."""

    needs_views = True

    def __init__(self, name: str, text: torch.Tensor, keep: float = 0.1):
        self.name, self.text, self.keep = name, text, keep

    def __call__(self, targets, views):
        out = []
        for v in views:                                           # V x D per image
            logits = LOGIT_SCALE * F.normalize(v.float(), dim=-1) @ self.text.t()
            kept, rest = confidence_order(logits, self.keep)
            votes = torch.bincount(logits[kept].argmax(-1), minlength=logits.shape[-1]).float()
            tied = votes == votes.max()
            if int(tied.sum()) > 1:
                votes[_break_tie(logits, tied, kept, rest)] += 1e-3
            out.append(torch.log(votes))
        return torch.stack(out)


def _break_tie(logits: torch.Tensor, tied: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor) -> int:
    """ZERO's tie-break: the argmax of the first view of ``rest`` (by increasing entropy) that
    votes for a ``tied`` class; else the tied class with the highest logit in the first view of
    ``rest`` (or in the last kept view, when none is left out)."""
    for i in rest.tolist():
        pred = int(logits[i].argmax())
        if tied[pred]:
            return pred
    row = logits[rest[0]] if len(rest) else logits[kept[-1]]
    return int(row.masked_fill(~tied, float("-inf")).argmax())


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
    classnames: the class names (label order); steps: AdamW steps per image (TPT: 1; with more,
    the views kept are those chosen at the first, as TPT's harness does); lr: 5e-3; keep: the
    fraction of views kept (TPT: 0.1); init: the context's initial words."""

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
            chosen = None                                          # the confident views, chosen at step 1
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = LOGIT_SCALE * feats @ self._text(ctx).t()
                    if chosen is None:
                        chosen = confidence_order(logits.detach(), self.keep)[0]
                    kept = logits[chosen]
                    avg = kept.log_softmax(-1).logsumexp(0) - math.log(kept.shape[0])   # log mean prob
                    loss = -(avg.exp() * avg).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                out.append(LOGIT_SCALE * F.normalize(target.float(), dim=-1) @ self._text(ctx).t())
        return torch.stack(out)


def _level(rng, severity: float) -> float:
    """An operation's strength on TPT's 0-10 scale, uniform in [0.1, severity]."""
    return float(rng.uniform(0.1, severity))


def _signed(rng, value):
    return -value if rng.uniform() > 0.5 else value


def _affine(img, coeffs):
    from PIL import Image

    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)


def _augmix_ops():
    """TPT's AugMix operations (those of AugMix without the four that overlap ImageNet-C's
    corruptions: colour, contrast, brightness, sharpness), each ``op(img, severity, rng)`` on a
    PIL image: autocontrast, equalize, posterize, rotate, solarize, shear and translate in x and
    y. At TPT's severity 1: posterize keeps 4 bits, rotations of 0-2 degrees, solarize above
    231-254, shears up to 0.03, translations up to 1/30 of the side."""
    from PIL import Image, ImageOps

    def posterize(img, sev, rng):
        return ImageOps.posterize(img, 4 - int(_level(rng, sev) * 4 / 10))

    def rotate(img, sev, rng):
        return img.rotate(_signed(rng, int(_level(rng, sev) * 30 / 10)), resample=Image.BILINEAR)

    def solarize(img, sev, rng):
        return ImageOps.solarize(img, 256 - int(_level(rng, sev) * 256 / 10))

    def shear(axis):
        def op(img, sev, rng):
            a = _signed(rng, _level(rng, sev) * 0.3 / 10)
            return _affine(img, (1, a, 0, 0, 1, 0) if axis == "x" else (1, 0, 0, a, 1, 0))
        return op

    def translate(axis):
        def op(img, sev, rng):
            side = img.size[0] if axis == "x" else img.size[1]
            t = _signed(rng, int(_level(rng, sev) * (side / 3) / 10))
            return _affine(img, (1, 0, t, 0, 1, 0) if axis == "x" else (1, 0, 0, 0, 1, t))
        return op

    return [lambda img, sev, rng: ImageOps.autocontrast(img), lambda img, sev, rng: ImageOps.equalize(img),
            posterize, rotate, solarize, shear("x"), shear("y"), translate("x"), translate("y")]


class Views:
    """``n - 1`` augmented views of a PIL image as a tensor (n - 1) x 3 x s x s in the teacher's
    normalization (the original, view 0, is the teacher's own preprocessing, made by the
    pipeline); picklable for the loader's workers.

    Each view, as TPT's harness makes it: a random resized crop to s x s (bilinear) and a random
    horizontal flip; with ``augmix`` (the fine-grained sets), AugMix on that crop: three chains of
    1-3 of TPT's operations (:func:`_augmix_ops`, ``severity`` 1), mixed with Dirichlet(1, 1, 1)
    weights, then mixed with the crop itself by a Beta(1, 1) weight (in float, after the
    normalization). Drawn from generators seeded by (``seed``, ``index``): the same views for the
    same image on every run."""

    def __init__(self, n: int, size: int, mean, std, *, augmix: bool = False, seed: int = 0, severity: float = 1.0):
        if n < 2:
            raise ValueError(f"views: expected at least 2 (the image and one augmented view), got {n}")
        self.n, self.size, self.mean, self.std, self.augmix, self.seed = n, size, mean, std, augmix, seed
        self.severity = severity
        self.indices = None

    def of(self, indices: Sequence[int]) -> "Views":
        """These views for a subset of a dataset's images: the loader's position j stands for the
        image ``indices[j]`` of the dataset (a resumed run, which leaves out the images done,
        draws each image's views as a whole run does)."""
        import copy

        out = copy.copy(self)
        out.indices = [int(i) for i in indices]
        return out

    def __call__(self, img, index: int) -> torch.Tensor:
        import numpy as np

        from ._compat import ensure_torchvision_importable

        ensure_torchvision_importable()                          # a worker may import it first
        import torchvision.transforms as T

        crop = T.Compose([T.RandomResizedCrop(self.size), T.RandomHorizontalFlip()])
        prep = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        ops = _augmix_ops() if self.augmix else []
        key = self.seed * 1_000_003 + (self.indices[index] if self.indices is not None else index)
        rng = np.random.default_rng(key)
        state = torch.random.get_rng_state()
        torch.manual_seed(key)                                    # the crops: torch's generator
        try:
            out = []
            for _ in range(self.n - 1):
                x = crop(img)
                view = prep(x)
                if ops:
                    w = torch.from_numpy(rng.dirichlet([1.0, 1.0, 1.0])).float()
                    m = float(rng.beta(1.0, 1.0))
                    mix = torch.zeros_like(view)
                    for i in range(3):
                        chain = x
                        for _ in range(int(rng.integers(1, 4))):
                            chain = ops[int(rng.integers(len(ops)))](chain, self.severity, rng)
                        mix += w[i] * prep(chain)
                    view = m * view + (1 - m) * mix
                out.append(view)
            return torch.stack(out)
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
