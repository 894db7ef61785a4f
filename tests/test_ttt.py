"""Test-time training follows spec section 2: reset per image, fresh Adam, no accumulation."""
import pytest
import torch
import torch.nn.functional as F

from apm_fast import TestTimeTrainer
from helpers import images_for, rel_err, tiny_model


def _targets(n, dim, seed=5):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hand_written_adam(model, image, target, steps, lr, backend="reference"):
    """Adam written out (no torch.optim), one image, from the model's current weights."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses = []
    for t in range(1, steps + 1):
        out = torch.func.functional_call(model, dict(zip(names, params)), (image,), {"backend": backend})
        loss = ((out.cls - target) ** 2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        losses.append(loss.item())
        with torch.no_grad():
            for i, g in enumerate(grads):
                if g is None:
                    continue
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mh, vh = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
                params[i] -= lr * mh / (vh.sqrt() + eps)
    with torch.no_grad():
        z = torch.func.functional_call(model, dict(zip(names, params)), (image,), {"backend": backend}).cls
    return z, torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fit_reproduces_hand_written_adam_trajectory(backend):
    model = tiny_model(init="authors")
    x, y = images_for(model, 2), _targets(2, model.config.dim)
    res = TestTimeTrainer(model, steps=5, lr=1e-3, backend=backend).fit(x, y)
    assert res.cls.shape == (2, model.config.dim) and res.losses.shape == (2, 5)
    for i in range(2):
        z, losses = _hand_written_adam(model, x[i:i + 1], y[i:i + 1], 5, 1e-3)
        assert rel_err(res.losses[i].double(), losses) < 1e-6   # losses are stored in float32
        assert rel_err(res.cls[i], z[0]) < 1e-10
    assert res.losses[:, -1].lt(res.losses[:, 0]).all(), "5 Adam steps should lower the loss"


def test_order_and_grouping_independence():
    model = tiny_model(init="authors")
    x, y = images_for(model, 4), _targets(4, model.config.dim)
    trainer = TestTimeTrainer(model, steps=3, lr=1e-3)
    whole = trainer.fit(x, y)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = trainer.fit(x[perm], y[perm])
    assert torch.equal(shuffled.cls, whole.cls[perm])
    assert torch.equal(shuffled.losses, whole.losses[perm])
    single = [trainer.fit(x[i:i + 1], y[i:i + 1]) for i in range(4)]
    assert torch.equal(torch.cat([r.cls for r in single]), whole.cls)


def test_model_is_back_at_snapshot_and_adam_state_is_fresh():
    model = tiny_model(init="authors")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = images_for(model, 2), _targets(2, model.config.dim)
    trainer = TestTimeTrainer(model, steps=4, lr=1e-2)
    first = trainer.fit(x[:1], y[:1])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    trainer.fit(x[1:], y[1:])  # some other image in between
    again = trainer.fit(x[:1], y[:1])
    assert torch.equal(first.cls, again.cls) and torch.equal(first.losses, again.losses)


def test_gradients_do_not_accumulate_across_steps():
    """With accumulation (the authors' zero_grad once per image) step 2 would use g1 + g2."""
    model = tiny_model(init="authors")
    x, y = images_for(model, 1), _targets(1, model.config.dim)
    res = TestTimeTrainer(model, steps=2, lr=1e-3, backend="reference").fit(x, y)
    _, losses = _hand_written_adam(model, x, y, 2, 1e-3)
    assert rel_err(res.losses[0].double(), losses) < 1e-6


def test_normalized_target_option():
    model = tiny_model(init="authors")
    x, y = images_for(model, 1), _targets(1, model.config.dim) * 7
    a = TestTimeTrainer(model, steps=2, lr=1e-3, normalize_target=True).fit(x, y)
    b = TestTimeTrainer(model, steps=2, lr=1e-3).fit(x, F.normalize(y, dim=-1))
    assert torch.allclose(a.cls, b.cls, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(lr=-1.0), "lr: expected a positive finite number"),
    (dict(lr=float("inf")), "lr: expected a positive finite number, got inf"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]: expected a number in \[0, 1\)"),
])
def test_bad_trainer_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TestTimeTrainer(tiny_model(), **kwargs)


def test_bad_targets():
    model = tiny_model()
    trainer = TestTimeTrainer(model, steps=1)
    x = images_for(model, 2)
    with pytest.raises(ValueError, match=r"expected shape B x D with D = 36.*got 2x35"):
        trainer.fit(x, torch.zeros(2, 35, dtype=torch.float64))
    with pytest.raises(ValueError, match="one target per image"):
        trainer.fit(x, torch.zeros(3, 36, dtype=torch.float64))
    bad = torch.zeros(2, 36, dtype=torch.float64)
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="targets: expected finite"):
        trainer.fit(x, bad)
    with pytest.raises(ValueError, match="pool=False"):
        TestTimeTrainer(tiny_model(pool=False))


def test_every_backend_starts_from_the_snapshot_taken_at_construction():
    """A change to the model after the trainer is built is not seen by any backend: each image
    starts from the parameters the trainer was built with (and the model keeps the change)."""
    model = tiny_model(init="authors")
    x, y = images_for(model, 2), _targets(2, model.config.dim)
    trainers = {b: TestTimeTrainer(model, steps=3, lr=1e-2, backend=b) for b in ("reference", "torch")}
    before = {b: t.fit(x, y) for b, t in trainers.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    changed = {n: p.detach().clone() for n, p in model.named_parameters()}
    for b, t in trainers.items():
        after = t.fit(x, y)
        assert torch.equal(after.cls, before[b].cls), b
        launched = t.launch(x[:1], y[:1])
        launched.wait()
        assert torch.equal(launched.cls, before[b].cls[:1]), b
    assert rel_err(before["torch"].cls, before["reference"].cls) < 1e-12
    for n, p in model.named_parameters():
        assert torch.equal(p, changed[n]), n


def test_frozen_parameters_are_trained_alike_on_every_backend():
    """TTT trains the whole trunk and pool whatever ``requires_grad`` says (the flags are left as
    they were), on the plain model as on the engine."""
    model = tiny_model(init="authors")
    model.conv.requires_grad_(False)
    x, y = images_for(model, 1), _targets(1, model.config.dim)
    res = {b: TestTimeTrainer(model, steps=3, lr=1e-2, backend=b).fit(x, y) for b in ("reference", "torch")}
    assert rel_err(res["torch"].cls, res["reference"].cls) < 1e-12
    assert not model.conv.weight.requires_grad and model.mlp[0].weight.requires_grad
    model.requires_grad_(False)
    frozen = TestTimeTrainer(model, steps=3, lr=1e-2, backend="reference").fit(x, y)
    assert torch.equal(frozen.cls, res["reference"].cls)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_launch_checks_shapes_and_dtypes_like_fit(backend):
    model = tiny_model()
    trainer = TestTimeTrainer(model, steps=1, backend=backend)
    x, y = images_for(model, 1), _targets(1, model.config.dim)
    s = model.config.image_size
    with pytest.raises(ValueError, match=rf"images: expected {s} x {s} pixels.*got {s + 1} x {s + 1}"):
        trainer.launch(torch.zeros(1, 3, s + 1, s + 1, dtype=torch.float64), y)
    with pytest.raises(ValueError, match=r"targets: expected shape B x D with D = 36.*got 1x35"):
        trainer.launch(x, torch.zeros(1, 35, dtype=torch.float64))
    with pytest.raises(TypeError, match="targets: expected a floating-point tensor, got torch.int64"):
        trainer.launch(x, torch.zeros(1, 36, dtype=torch.int64))


def test_an_fp32_training_on_the_torch_table_is_as_close_to_float64_as_the_reference():
    """Adam's bias corrections 1 - beta^t are taken in fp64 and rounded once (in fp32, 1 - 0.999^1
    is 1.3e-5 off: every step's size was off by that, 8e-6 in the trained cls here)."""
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float32)
    wide = tiny_model(dtype=torch.float64)
    wide.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, y = images_for(model, 2), _targets(2, model.config.dim).float()
    want = TestTimeTrainer(wide, steps=3, lr=1e-2, backend="reference").fit(x.double(), y.double()).cls
    for backend in ("reference", "torch"):
        got = TestTimeTrainer(model, steps=3, lr=1e-2, backend=backend).fit(x, y).cls.double()
        assert rel_err(got, want) < 1e-6, backend


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_training_ignores_an_ambient_autocast(backend):
    """An fp32 training inside torch.autocast (CPU, bf16) trains in fp32 as it states, on the
    reference loop as on the engine: the same results inside and outside the region."""
    model = tiny_model(dtype=torch.float32, init="authors")
    x, y = images_for(model, 2), _targets(2, model.config.dim).float()
    trainer = TestTimeTrainer(model, steps=4, lr=1e-2, backend=backend)
    outside, launched = trainer.fit(x, y), trainer.launch(x[:1], y[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, launched_inside = trainer.fit(x, y), trainer.launch(x[:1], y[:1])
    assert trainer.precision == "fp32" and inside.cls.dtype == torch.float32
    assert torch.equal(inside.cls, outside.cls) and torch.equal(inside.losses, outside.losses)
    launched_inside.wait(), launched.wait()
    assert torch.equal(launched_inside.cls, launched.cls)


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float64, "fp64")])
def test_the_reference_backend_takes_only_the_moments_it_keeps(dtype, name):
    """torch.optim.Adam keeps its moments in the parameters' dtype: the reference backend accepts
    moments=None or that dtype's name, and refuses the others (before, a bf16 model took
    moments='fp32' and kept bf16 ones)."""
    model = tiny_model(dtype=dtype)
    for moments in (None, name):
        assert TestTimeTrainer(model, steps=1, backend="reference", moments=moments).moments == name
    for moments in {"fp32", "bf16"} - {name}:
        with pytest.raises(ValueError, match=rf"moments: the reference backend keeps Adam's moments in the model's "
                                             rf"dtype.*expected '{name}' \(or none given\), got '{moments}'"):
            TestTimeTrainer(model, steps=1, backend="reference", moments=moments)
