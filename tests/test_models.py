"""WCVD / WCID architecture: blind kernel, shapes, periodic padding, ensemble, refusal."""
import numpy as np
import pytest
import torch

from emdenoise.errors import InputError
from emdenoise.models import WCVD, WCVDParams, build_model, check_blind_state, resolve_device
from emdenoise.train import load_checkpoint, save_checkpoint

P3 = WCVDParams()
P2 = WCVDParams(dims=2)


def _rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))


def _centre(w):
    return w[(slice(None), 0) + tuple(s // 2 for s in w.shape[2:])]


def _perturb(model, seed=1, scale=0.05):
    """Move weights away from the symmetric init (keeps the masked centre untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for b in model.branches:
            b.bck.weight.mul_(b.bck.mask)
    return model


@pytest.mark.parametrize("params", [P3, P2], ids=["wcvd", "wcid"])
def test_bck_shapes_and_centre_zero_at_init(params):
    m = build_model(params)
    for b, ks in zip(m.branches, params.ks):
        w = b.bck.weight
        assert w.shape == ((3, 1, 3, ks, ks) if params.dims == 3 else (3, 1, ks, ks))
        assert torch.all(_centre(w) == 0)
        assert torch.count_nonzero(w) == w.numel() - 3  # only the centre taps are zero
        assert not hasattr(b.bck, "bias") or b.bck.bias is None


@pytest.mark.parametrize("params", [P3, P2], ids=["wcvd", "wcid"])
def test_bck_centre_gradient_zero_and_stays_zero_after_adam(params):
    m = build_model(params)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for step in range(3):
        loss = (m(_rand(2, 5, 16, 16, seed=step)) - 0.3).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for b in m.branches:
            g = b.bck.weight.grad
            assert torch.all(_centre(g) == 0)
            assert step > 0 or torch.count_nonzero(g) > 0  # the test can see gradients
        opt.step()
    for b in m.branches:
        assert torch.all(_centre(b.bck.weight) == 0)


def test_gradient_hook_alone_zeroes_centre_gradient():
    # The paper's mechanism (hook), independent of the forward mask.
    m = build_model(P3)
    bck = m.branches[0].bck
    w = bck.weight
    (w * torch.arange(w.numel(), dtype=torch.float32).view(w.shape)).sum().backward()
    assert torch.all(_centre(w.grad) == 0)
    assert torch.count_nonzero(w.grad) == w.numel() - 3 - 1  # tap 0 has gradient 0 too


@pytest.mark.parametrize("params", [P3, P2], ids=["wcvd", "wcid"])
def test_centre_value_cannot_influence_output(params):
    m = _perturb(build_model(params))
    x = _rand(1, 5, 20, 20)
    ref = m(x)
    with torch.no_grad():
        for b in m.branches:
            _centre(b.bck.weight).fill_(7.0)
    assert torch.equal(m(x), ref)


def test_output_shapes():
    x = _rand(2, 6, 20, 24)
    assert build_model(P3)(x).shape == (2, 4, 20, 24)
    assert build_model(P2)(x).shape == (2, 6, 20, 24)
    assert build_model(P3)(x, "valid").shape == (2, 4, 14, 18)
    assert build_model(WCVDParams(kt=5, ks=(3,)))(x, "valid").shape == (2, 2, 18, 22)


@pytest.mark.parametrize("params", [P3, P2, WCVDParams(bias=False), WCVDParams(n_layers=0),
                                    WCVDParams(context=2), WCVDParams(kt=5, context=1, blindspot=3)],
                         ids=["wcvd", "wcid", "no-bias", "no-hidden", "context", "kt5-context-b3"])
def test_merged_forward_equals_literal_conv3d_reference(params):
    m = _perturb(build_model(params, seed=3))
    x = _rand(2, 5, 18, 22)
    torch.testing.assert_close(m(x), m.forward_reference(x), rtol=1e-5, atol=1e-6)


def test_periodic_padding_equals_wrapped_input_with_valid_conv():
    m = _perturb(build_model(P3))
    x = _rand(1, 5, 16, 20)
    h = P3.halo_s
    wrapped = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (h, h), (h, h)), mode="wrap"))
    torch.testing.assert_close(m(x, "circular"), m(wrapped, "valid"), rtol=1e-5, atol=1e-6)
    # and a circular shift of the input shifts the output (no edge special-casing)
    rolled = m(torch.roll(x, shifts=(5, -7), dims=(2, 3)))
    torch.testing.assert_close(rolled, torch.roll(m(x), shifts=(5, -7), dims=(2, 3)), rtol=1e-5, atol=1e-6)


def test_ensemble_output_is_a_softmax_weighted_sum_of_branches():
    m = _perturb(build_model(P3))
    x = _rand(1, 4, 16, 16)
    outs = []
    with torch.no_grad():
        for i in range(3):
            m.ensemble_logits.copy_(200.0 * torch.eye(3)[i])  # softmax -> one-hot
            outs.append(m(x))
        logits = torch.tensor([0.2, -0.3, 1.1])
        m.ensemble_logits.copy_(logits)
        mixed = m(x)
    a = torch.softmax(logits, 0)  # convex weights, as in the released code
    assert abs(float(m.ensemble_weights.detach().sum()) - 1) < 1e-6 and bool((m.ensemble_weights > 0).all())
    torch.testing.assert_close(mixed, sum(ai * oi for ai, oi in zip(a, outs)), rtol=1e-5, atol=1e-6)
    assert bool((mixed >= 0).all())  # a convex combination of ReLU outputs stays >= 0
    assert not torch.allclose(outs[0], outs[2])  # the branches really differ (Ks = 3 vs 7)
    assert isinstance(m.ensemble_logits, torch.nn.Parameter) and m.ensemble_logits.requires_grad


def test_bias_free_model_is_scale_equivariant_and_biased_is_not():
    x = _rand(1, 4, 16, 16)
    m = _perturb(build_model(WCVDParams(bias=False)))
    torch.testing.assert_close(m(37.5 * x), 37.5 * m(x), rtol=1e-5, atol=1e-5)
    m = _perturb(build_model(WCVDParams(bias=True)))
    assert not torch.allclose(m(37.5 * x), 37.5 * m(x), rtol=1e-3)
    assert "branches.0.hidden_b.0" in m.state_dict() and "branches.0.out_b" in m.state_dict()
    assert not any("bck.bias" in k for k in m.state_dict())  # the BCK never has a bias


def test_untrained_model_preserves_mean_of_flat_input():
    x = torch.full((1, 5, 16, 16), 2.5)
    torch.testing.assert_close(build_model(P3)(x), torch.full((1, 3, 16, 16), 2.5))


def test_same_seed_same_weights_and_other_seed_differs():
    a, b, c = build_model(P3, 4).state_dict(), build_model(P3, 4).state_dict(), build_model(P3, 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["branches.2.bck.weight"], c["branches.2.bck.weight"])


@pytest.mark.parametrize("kw", [dict(ks=(3, 4)), dict(kt=2), dict(dims=4), dict(channels=0)])
def test_invalid_params_are_refused(kw):
    with pytest.raises(InputError):
        WCVDParams(**kw)


def test_params_roundtrip_dict():
    p = WCVDParams(ks=(3, 5), channels=2, bias=False)
    assert WCVDParams.from_dict(p.to_dict()) == p
    assert isinstance(p.to_dict()["ks"], list)


def test_frames_too_small_for_circular_padding_are_refused():
    with pytest.raises(ValueError):
        build_model(P3)(_rand(1, 3, 6, 20))


def test_check_blind_state_refuses_nonzero_centre():
    state = build_model(P3).state_dict()
    check_blind_state(state, "ok.pt")  # passes
    state["branches.1.bck.weight"][(0, 0, 1, 2, 2)] = 1e-6
    with pytest.raises(InputError, match="centre weight of the blind kernel is not zero"):
        check_blind_state(state, "bad.pt")


def test_load_checkpoint_refuses_nonzero_centre(tmp_path):
    m = build_model(P2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ckpt = {"state_dict": state, "model_params": P2.to_dict(),
            "normalisation": {"offset": 0.0, "scale": 1.0}}
    good = tmp_path / "good.pt"
    save_checkpoint(ckpt, good)
    load_checkpoint(good)  # loads fine
    state["branches.0.bck.weight"][(2, 0, 1, 1)] = 0.25
    bad = tmp_path / "bad.pt"
    save_checkpoint(ckpt, bad)
    with pytest.raises(InputError, match="centre weight of the blind kernel is not zero") as err:
        load_checkpoint(bad)
    assert err.value.path == str(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_resolve_device_without_cuda():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(InputError):
        resolve_device("cuda")


def test_model_is_module():
    assert isinstance(build_model(P3), WCVD)


def test_context_means_leave_out_the_centre_frame_and_match_a_window():
    # Each context channel is the mean of frames t-r..t+r without t, and a block gives the
    # same values as each window on its own (the CPU path computes them per tile).
    from emdenoise.models import context_means
    x = torch.rand(1, 11, 4, 5)
    c = context_means(x, 3, (3, 1))                                  # centres 3..7
    assert c.shape == (1, 5, 2, 4, 5)
    for j, t in enumerate(range(3, 8)):
        ref = (x[0, t - 3:t + 4].sum(0) - x[0, t]) / 6
        torch.testing.assert_close(c[0, j, 0], ref)
        torch.testing.assert_close(c[0, j, 1], (x[0, t - 1] + x[0, t + 1]) / 2)
        assert torch.equal(context_means(x[:, t - 3:t + 4], 3, (3, 1))[0, 0], c[0, j])
    assert WCVDParams(context=6).context_radii == (6, 3, 1) and WCVDParams(context=6).kt_eff == 13
    assert WCVDParams(kt=7, context=2).kt_eff == 7 and WCVDParams().context_radii == ()


@pytest.mark.parametrize("params", [WCVDParams(context=3), WCVDParams(blindspot=5)], ids=["context", "b5"])
def test_blind_spot_and_context_gradients(params):
    # d out(t, p) / d x(t, q) == 0 for |q - p| <= b (Chebyshev) and != 0 just outside;
    # the context reaches frames t +- R at p itself.
    m = _perturb(build_model(params, seed=5))
    x = _rand(1, params.kt_eff + 2, 21, 21).requires_grad_(True)
    m(x)[0, 1, 10, 10].backward()
    g = x.grad[0, 1 + params.halo_t].abs()
    b = params.blind_radius
    assert float(g[10 - b:11 + b, 10 - b:11 + b].max()) == 0.0
    assert float(g[10 - b - 1, 10]) > 0
    if params.context:
        assert float(x.grad[0, 1 + params.halo_t + params.context, 10, 10].abs()) > 0


def test_check_blind_state_knows_the_blind_spot():
    params = WCVDParams(blindspot=3)
    state = build_model(params).state_dict()
    check_blind_state(state, "ok.pt", params.blind_radius)
    key = next(k for k in state if k.endswith("bck.weight"))
    state[key][0, 0, 1, 0, 0] = 0.1     # one px from the centre, inside a 3x3 blind spot
    check_blind_state(state, "ok-for-b0.pt", 0)
    with pytest.raises(InputError, match="not zero"):
        check_blind_state(state, "bad.pt", params.blind_radius)
    with pytest.raises(InputError, match="blindspot"):
        WCVDParams(dims=2, blindspot=3, ks=(3, 5))
