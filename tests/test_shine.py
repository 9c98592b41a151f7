"""SHINE: exact blind spot (random-init and trained), training, checkpoints, inference,
automatic model choice.  Tiny networks and movies so the file runs in well under a minute."""
import csv

import numpy as np
import pytest
import torch

from emdenoise.config import SHINEParams, TrainParams, WCVDParams, shine_train_params
from emdenoise.errors import InputError
from emdenoise.infer import denoise, predict_block
from emdenoise.metrics import select_model, self_supervised_loss
from emdenoise.models import SHINE, build_shine, check_shine_state
from emdenoise.train import (Normalisation, _Frames, _Sampler, _split, load_checkpoint, lr_factor,
                             model_from_checkpoint, save_checkpoint, train_model)

SIZES = (1, 3, 5, 7, 9)
TINY = dict(channels=8, centre_channels=8, neighbour_channels=4, blocks=2, head_layers=1)
FAST = TrainParams(epochs=2, batch_size=4, crop=32, val_crop=32, device="cpu", seed=0)


def tiny(blindspot=3, **kw) -> SHINEParams:
    return SHINEParams(blindspot=blindspot, **{**TINY, **kw})


def movie(t=7, n=40, seed=0):
    """(T, n, n) float32: static Gaussian 'columns' + PSF-correlated noise, offset 100."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    clean = 100 + 50 * np.exp(-(((yy % 8) - 4) ** 2 + ((xx % 8) - 4) ** 2) / 4.0)
    white = rng.normal(0, 20, (t, n + 2, n + 2))
    noise = (white[:, 1:-1, 1:-1] + 0.5 * (white[:, :-2, 1:-1] + white[:, 2:, 1:-1]
                                           + white[:, 1:-1, :-2] + white[:, 1:-1, 2:]))
    return (clean[None] + noise).astype(np.float32)


def input_gradient(model: SHINE, shape=(5, 40, 40), p=(20, 21), padding="zeros", seed=0):
    """d out(p) / d input, (frames, Y, X) float64, for a window centred on frame 2."""
    model = model.double()
    x = torch.rand((1, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    model(x, padding)[0, 0, p[0], p[1]].backward()
    return x.grad[0]


def assert_exact_blind_spot(model: SHINE, p=(20, 21), padding="zeros", shape=(5, 40, 40)):
    mp = model.params
    g = input_gradient(model, shape, p, padding)
    b = mp.blind_radius
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    dy, dx = abs(yy - p[0]), abs(xx - p[1])
    if padding == "circular":  # distances on the torus
        dy, dx = np.minimum(dy, shape[1] - dy), np.minimum(dx, shape[2] - dx)
    dist = torch.from_numpy(np.maximum(dy, dx))
    centre = g[mp.frames // 2]
    inside = centre[dist <= b]
    assert inside.numel() == mp.blindspot ** 2
    assert torch.count_nonzero(inside) == 0, "output depends on a centre-frame pixel in the blind spot"
    # every centre-frame pixel just outside the blind spot, up to the receptive field, is seen
    ring = centre[(dist > b) & (dist <= 2 * mp.blocks + mp.dilation(mp.blocks))]
    assert torch.count_nonzero(ring) == ring.numel()
    # neighbour frames are seen at p itself and around it
    neigh = torch.cat([g[:mp.frames // 2], g[mp.frames // 2 + 1:]])
    assert torch.count_nonzero(neigh[:, p[0] - 1:p[0] + 2, p[1] - 1:p[1] + 2]) == neigh.shape[0] * 9


@pytest.mark.parametrize("size", SIZES)
def test_blind_spot_exact_random_init(size):
    assert_exact_blind_spot(build_shine(tiny(size), seed=size))


def test_blind_spot_exact_circular_and_corrupted_centre():
    model = build_shine(tiny(5), seed=1)
    assert_exact_blind_spot(model, p=(1, 38), padding="circular")  # near a wrapped border
    with torch.no_grad():  # a non-zero centre tap is masked in forward, still exact ...
        for conv in model.collect:
            conv.weight[..., 1, 1] = 1.0
    assert_exact_blind_spot(model)
    with pytest.raises(InputError, match="centre weight"):  # ... but refused on loading
        check_shine_state(model.state_dict(), "m.pt")


def test_blind_spot_exact_after_training():
    ckpt = train_model(movie(), tiny(5), FAST)
    model = model_from_checkpoint(ckpt, None, "cpu")
    assert ckpt["model"] == "shine" and ckpt["best_epoch"] >= 1
    assert not torch.equal(model.state_dict()["collect.0.weight"],
                           build_shine(tiny(5), seed=0).state_dict()["collect.0.weight"])
    assert_exact_blind_spot(model)


def test_receptive_field_halo_and_valid_tiles():
    mp = tiny(3)
    model = build_shine(mp, seed=0).eval()
    hs = mp.halo_s
    assert hs == 4 * mp.blocks + mp.blind_radius + 2
    x = torch.rand(1, 6, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(x, "circular")
        valid = model(x, "valid")
        zeros = model(x, "zeros")
    assert whole.shape == (1, 2, 48, 48) and valid.shape == (1, 2, 48 - 2 * hs, 48 - 2 * hs)
    inner = (slice(None), slice(None), slice(hs, 48 - hs), slice(hs, 48 - hs))
    torch.testing.assert_close(valid, whole[inner], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(valid, zeros[inner], rtol=1e-5, atol=1e-6)
    # the output depends on nothing farther than halo_s px
    g = input_gradient(build_shine(mp, seed=0), (5, 48, 48), (24, 24))
    yy, xx = np.mgrid[:48, :48]
    far = torch.from_numpy(np.maximum(abs(yy - 24), abs(xx - 24)) > hs)
    assert torch.count_nonzero(g[:, far]) == 0 and torch.count_nonzero(g[:, ~far]) > 0
    with pytest.raises(ValueError, match="larger than"):
        model(torch.rand(1, 5, 2 * hs, 2 * hs), "circular")


def test_params_validation_and_dilations():
    with pytest.raises(InputError, match="blindspot"):
        SHINEParams(blindspot=4)
    with pytest.raises(InputError, match="frames"):
        SHINEParams(frames=4)
    p = SHINEParams(blindspot=9)
    assert (p.frames, p.centre_channels, p.neighbour_channels, p.blocks) == (5, 48, 16, 8)
    # dilation exceeds the block's centre-frame radius 2i by the blind-spot radius
    assert [p.dilation(i) - 2 * i for i in range(1, 9)] == [5] * 8
    assert SHINEParams.from_dict(p.to_dict()) == p
    tp = shine_train_params(epochs=3)
    assert (tp.batch_size, tp.crop, tp.lr, tp.epochs) == (16, 256, 1e-3, 3)


def test_training_deterministic_and_logged(tmp_path):
    stack = movie(n=80)  # 7 target frames (the edge ones with mirrored windows): 2 validate
    a = train_model(stack, tiny(3), FAST, log_csv=tmp_path / "log.csv")
    b = train_model(stack, tiny(3), FAST)
    c = train_model(stack, tiny(3), TrainParams(**{**FAST.__dict__, "seed": 1}))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) and np.isfinite(float(r["val_loss"])) for r in rows)
    assert a["validation"]["mode"] == "temporal" and len(a["validation"]["frames"]) == 2


def test_two_frames_held_out_for_validation():
    ckpt = train_model(movie(t=9), tiny(1), FAST)  # 5 target frames: 2 validate, 3 train
    assert ckpt["validation"]["mode"] == "temporal" and len(ckpt["validation"]["frames"]) == 2


def test_lr_warmup_then_cosine():
    f = lr_factor(100, "cosine", SHINE.warmup_fraction)
    lrs = [f(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(x < y for x, y in zip(lrs[:5], lrs[1:5]))
    assert all(x >= y for x, y in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.05
    assert lr_factor(100, "constant", SHINE.warmup_fraction)(50) == 1.0
    assert lr_factor(100, "cosine")(0) == 1.0  # WCVD: no warm-up


def test_sampler_crops_with_a_real_halo_rot90_and_flips():
    """SHINE trains on crops carrying a real-pixel halo of halo_s px ('valid' padding),
    as inference sees them -- not on zero-padded crops (issue 9 item 6)."""
    t, n = 7, 40
    z = np.arange(t * n * n, dtype=np.float32).reshape(t, n, n)  # every pixel unique
    mp = tiny(1)
    h = mp.halo_s
    tp = TrainParams(crop=8, batch_size=64, augment=True, seed=0, val_frames=0)
    sampler = _Sampler([_Frames(z, Normalisation(0.0, 1.0))], [_split(z.shape, mp, tp)], mp, tp)
    x, tgt = sampler.batch(64)
    assert sampler.padding == "valid" and x.shape == (64, 5, 8 + 2 * h, 8 + 2 * h)
    assert np.array_equal(tgt, x[:, 2, h:-h, h:-h])
    x = x[:, :, h:-h, h:-h]  # the crops themselves
    kinds = set()
    from emdenoise.tiling import window_index

    for w in x:
        tc = int(w[2].min()) // (n * n)  # the centre frame; edge frames have mirrored windows
        frames = window_index(tc, tc + 1, t, 2)[0]
        for k in range(4):
            for flip in (False, True):
                v = np.rot90(w, -k, axes=(1, 2))
                v = v[:, :, ::-1] if flip else v
                y0, x0 = divmod(int(v[2, 0, 0]) - tc * n * n, n)
                if np.array_equal(v, z[frames, y0:y0 + 8, x0:x0 + 8]):
                    kinds.add((k, flip))
                    break
            else:
                continue
            break
        else:
            pytest.fail("a training window is not a dihedral transform of a crop of its 5 frames")
    assert len(kinds) >= 6  # rotations by 90 deg and mirrors both occur


def test_checkpoint_roundtrip_and_model_keys(tmp_path):
    stack = movie()
    ckpt = train_model(stack, tiny(3), FAST)
    save_checkpoint(ckpt, tmp_path / "shine.pt")
    model, loaded = load_checkpoint(tmp_path / "shine.pt")
    assert isinstance(model, SHINE) and loaded["model"] == "shine"
    assert model.params == tiny(3) and loaded["format"] == "emdenoise-shine/1"
    for dims, name in ((3, "wcvd"), (2, "wcid")):
        w = train_model(stack, WCVDParams(dims=dims), TrainParams(epochs=1, crop=16, device="cpu"))
        assert w["model"] == name
        assert not isinstance(model_from_checkpoint(w), SHINE)
    bad = dict(ckpt, state_dict={k: v.clone() for k, v in ckpt["state_dict"].items()})
    bad["state_dict"]["collect.1.weight"][0, 0, 1, 1] = 0.5
    with pytest.raises(InputError, match="centre weight"):
        model_from_checkpoint(bad, "bad.pt")


def test_denoise_mirrored_edge_frames():
    stack = movie(t=6)
    ckpt = train_model(stack, tiny(3), FAST)
    model = model_from_checkpoint(ckpt)
    out = denoise(model, ckpt, stack, device="cpu", batch_frames=2)
    assert out.shape == stack.shape and out.dtype == np.float32
    # windows mirrored about their centre frame: never the centre twice
    for t, idx in ((0, [2, 1, 0, 1, 2]), (1, [3, 0, 1, 2, 3]), (4, [2, 3, 4, 5, 2]), (5, [3, 4, 5, 4, 3]),
                   (2, [0, 1, 2, 3, 4])):
        ref = predict_block(model, stack[idx], normalisation=ckpt, device="cpu")
        np.testing.assert_allclose(out[t], ref[0], rtol=1e-5, atol=1e-3)
    with pytest.raises(InputError, match="too short"):
        denoise(model, ckpt, stack[:2], device="cpu")


def test_select_model_picks_known_best_on_correlated_noise():
    rng = np.random.default_rng(0)
    clean = np.broadcast_to(rng.uniform(0, 10, (1, 24, 24)), (12, 24, 24)).astype(np.float32)
    white = rng.normal(0, 2, (12, 26, 26))
    noise = white[:, 1:-1, 1:-1] + white[:, :-2, 1:-1] + white[:, 1:-1, :-2]  # correlated
    noisy = (clean + noise).astype(np.float32)
    # J-invariant candidates (they do not depend on the noisy movie at all here): the loss
    # ranks them by their true MSE even though the noise is spatially correlated
    cands = {"truth": clean.copy(), "blurred_truth": clean * 0.8 + 1.0}
    res = select_model({k: self_supervised_loss(v, noisy) for k, v in cands.items()})
    assert res["chosen"] == "truth" and set(res["loss"]) == set(cands)
    assert res["loss"]["truth"] < res["loss"]["blurred_truth"] and "Noise2Self" in res["rule"]
