"""open_clip models for the comparisons: image towers of a given size and one TPT step.

All models have random weights (``pretrained=None``): the cost of a forward or backward does not
depend on the values. In quick mode the towers keep their layout but are shrunk (2 blocks,
width 64) so that the CPU suite stays small; their rows say so.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import autocast
from .flops import vit_flops

__all__ = ["import_open_clip", "build_clip", "check_tower_names", "tower_flops", "text_tower_flops", "tower_params",
           "tower_patch", "TPTStep", "TINY_VISION", "TINY_TEXT"]

TINY_VISION = dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
TINY_TEXT = dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)
# Image-tower-only builds replace the text tower by this stub (dropped before build_clip returns).
_TEXT_STUB = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)


def import_open_clip():
    """open_clip, through the package's guard for a CPU torch beside a CUDA torchvision."""
    from .._compat import import_open_clip as _import

    return _import()


def build_clip(name: str, *, device, image_size: int | None = None, quick: bool = False,
               with_text: bool = True):
    """An open_clip model with random weights on ``device``, in eval mode.

    ``image_size`` changes the number of patch tokens; ``with_text=False`` gives the image tower
    alone (``model.visual``: the stub text tower it is built with is dropped before returning, so
    that only the image tower stays on the device, as its parameters and weight bytes count);
    ``quick`` shrinks both towers."""
    oc = import_open_clip()
    kw = {}
    if quick:
        vision = dict(TINY_VISION)
        if image_size is not None:
            vision["image_size"] = int(image_size)
        kw.update(vision_cfg=vision, text_cfg=dict(TINY_TEXT), embed_dim=32)
    else:
        if image_size is not None:
            kw["force_image_size"] = int(image_size)
        if not with_text:
            kw["text_cfg"] = dict(_TEXT_STUB)
    device = torch.device(device)
    with torch.device(device):  # allocate directly on the device (H/14 is 0.6 G parameters)
        model = oc.create_model(name, pretrained=None, device=device, **kw)
    if with_text:
        return model.eval()
    visual = model.visual.eval()
    del model                    # the text tower's memory goes back to the caller's allocator
    return visual


def check_tower_names(names, argument: str) -> None:
    """ValueError naming ``argument`` unless every name is an open_clip model (``ViT-B/16`` is
    read as ``ViT-B-16``, as open_clip does), or when open_clip cannot be imported to check them."""
    names = list(names)
    if not names:
        return
    try:
        known = set(import_open_clip().list_models())
    except ImportError as exc:
        raise ValueError(f"{argument}: expected open_clip model names, got {names}, which cannot be checked: "
                         f"{exc}") from exc
    bad = [n for n in names if n not in known and n.replace("/", "-") not in known]
    if bad:
        import difflib

        close = sorted({c for n in bad for c in difflib.get_close_matches(n, known, n=3, cutoff=0.5)})
        raise ValueError(f"{argument}: expected open_clip model names (`apm-fast info --teachers` lists them), "
                         f"got unknown {bad}" + (f"; close matches: {close}" if close else ""))


def tower_patch(name: str, *, quick: bool = False) -> int:
    """The patch size of a named image tower (of the shrunk one in quick mode)."""
    if quick:
        return TINY_VISION["patch_size"]
    cfg = import_open_clip().get_model_config(name)
    if cfg is None:
        raise ValueError(f"CLIP model: unknown open_clip name {name!r}")
    return int(cfg["vision_cfg"]["patch_size"])


def tower_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _image_size(visual) -> int:
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size)


def tower_flops(visual, *, batch: int = 1) -> dict:
    """Analytic FLOPs of one forward of an open_clip ViT image tower, read off the module."""
    blocks = visual.transformer.resblocks
    width = visual.transformer.width
    patch = visual.conv1.kernel_size[0]
    proj = visual.proj
    out_dim = proj.shape[1] if proj is not None else width
    return vit_flops(width=width, layers=len(blocks), patch=patch, image=_image_size(visual),
                     mlp_width=blocks[0].mlp.c_fc.out_features, out_dim=out_dim, batch=batch)


def text_tower_flops(model, prompts: int) -> dict:
    """Analytic FLOPs of the text tower over ``prompts`` prompts: forward, and the backward to
    the prompt embeddings with frozen weights (activation gradients only: 1x the projections,
    2x the q k^T / a v products)."""
    t = model.transformer
    n = model.positional_embedding.shape[0]
    blocks = t.resblocks
    width = t.width
    mlp = blocks[0].mlp.c_fc.out_features
    proj = (2 * n * width * 3 * width + 2 * n * width * width + 2 * n * width * mlp * 2)
    attn = 4 * n * n * width
    out = model.text_projection
    out_dim = out.shape[1] if torch.is_tensor(out) else out.out_features
    fwd = prompts * (len(blocks) * (proj + attn) + 2 * width * out_dim)
    bwd = prompts * (len(blocks) * (proj + 2 * attn) + 2 * width * out_dim)
    return {"forward": fwd, "backward": bwd, "tokens": n}


class TPTStep:
    """One step of test-time prompt tuning (TPT, Shu et al. 2022) as its cost is structured:
    ``views`` augmented views through the image tower (no gradient), ``prompts`` class prompts
    through the text tower with a learnable 4-token context, the marginal entropy of the 10 %
    most confident views, and a backward through the text tower to the context (AdamW).

    The prompts are synthetic token sequences of the full context length ([SOT], context,
    a few class tokens, [EOT]): the text tower's cost does not depend on which tokens they are.
    """

    def __init__(self, model, *, views: int, prompts: int, device, amp_dtype=None,
                 n_ctx: int = 4, confident: float = 0.1, seed: int = 0):
        self.model = model
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        width = model.token_embedding.weight.shape[1]
        vocab = model.token_embedding.weight.shape[0]
        n = model.positional_embedding.shape[0]
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter((torch.randn(n_ctx, width, generator=gen) * 0.02).to(self.device))
        sot, eot = vocab - 2, vocab - 1   # the highest id is [EOT]: the argmax pooling finds it
        tokens = torch.zeros(prompts, n, dtype=torch.long)
        tokens[:, 0] = sot
        body = min(n - 2 - n_ctx, 4)
        tokens[:, 1 + n_ctx:1 + n_ctx + body] = torch.randint(1, vocab - 2, (prompts, body), generator=gen)
        tokens[:, 1 + n_ctx + body] = eot
        self.tokens = tokens.to(self.device)
        size = _image_size(model.visual)
        self.images = torch.randn(views, 3, size, size, generator=gen).to(self.device)
        self.keep = max(1, int(round(views * confident)))
        self.opt = torch.optim.AdamW([self.ctx], lr=5e-3)

    def encode_text(self):
        m = self.model
        x = m.token_embedding(self.tokens)
        x = torch.cat([x[:, :1], self.ctx[None].expand(x.shape[0], -1, -1).to(x.dtype),
                       x[:, 1 + self.n_ctx:]], dim=1)
        x = x + m.positional_embedding.to(x.dtype)
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = m.transformer(x, attn_mask=m.attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def loss(self):
        with autocast(self.device, self.amp_dtype):
            with torch.no_grad():
                img = F.normalize(self.model.encode_image(self.images), dim=-1)
            txt = F.normalize(self.encode_text(), dim=-1)
            logits = 100.0 * img.float() @ txt.float().t()         # views x prompts
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        chosen = logp[entropy.argsort()[:self.keep]]
        avg = chosen.logsumexp(dim=0) - torch.log(torch.tensor(float(self.keep), device=logp.device))
        return -(avg.exp() * avg).sum()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return loss.detach()
