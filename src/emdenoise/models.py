"""WCID / WCVD blind-spot denoisers (WCVD paper, section 2.1, methods 4.1, SM Fig. S1-S2).

One model = an ensemble of branches, one per spatial kernel size Ks (3, 5, 7):

    input windows (N, Kt, Y, X)                    Kt = 3 frames (WCVD) or 1 (WCID)
      -> blind convolution kernel (BCK)            weight (C, 1, Kt, Ks, Ks), no bias,
                                                   centre weight fixed at zero,
                                                   periodic (circular) spatial padding,
                                                   valid temporal padding
      -> N_L x [1x1(x1) conv C->C, LeakyReLU(0.1)]
      -> 1x1(x1) conv C->1, ReLU
    output = sum_i  a_i * branch_i                 a = softmax(learned logits): convex,
                                                   initialised 1/n_branches

A WCVD window of Kt frames centred on frame t predicts frame t; the BCK never sees
pixel (t, y, x) itself, so the network cannot learn the identity and is trained with a
plain MSE against the noisy frame (Noise2Void / Noise2Self principle).

Beyond the paper (``WCVDParams``): ``blindspot`` masks the centre frame's taps within
b = blindspot // 2 px (detector-correlated noise), ``context`` R adds input channels
holding the means of frames t-R..t+R *without frame t* (:func:`context_means`), seen
through an unmasked kernel per branch (``_Branch.ctx``), and :meth:`WCVD.initialise`
starts every branch from the least-squares linear blind-spot predictor.

Implementation notes (why it looks different from a literal Conv3d stack):
- The Kt temporal taps are treated as the *input channels* of a 2D convolution over
  temporal windows.  With valid temporal padding this is exactly a Conv3d with one input
  channel, but oneDNN runs it 2x faster on CPU (channels-last 2D conv).
- All branches are run as one convolution: each branch's Ks x Ks kernel is zero-padded
  to Ks_max x Ks_max and the kernels are concatenated along output channels; the 1x1
  layers become dense 1x1 convolutions with block-diagonal weights (one block per
  branch; faster on CPU than grouped convolutions of 3 channels).  Parameters stay
  per branch; :meth:`WCVD.forward_reference` is the literal per-branch Conv3d/Conv2d
  version used by the tests to prove the two agree.

Bias in the 1x1 layers (``WCVDParams.bias``, default True): the paper says only that
the BCK has no bias; the BCK stays bias-free here too.  Without *any* bias the network
would be positively homogeneous, f(a*x) = a*f(x), i.e. equivariant to the intensity
scale -- attractive, but measured to cost 0.4 dB PSNR on the synthetic counting-mode
movie (22.5 vs 22.9 dB, bench/bench_wcvd.py; the least-squares linear blind-spot
predictor on the same 3x7x7 support shows the same 22.47 vs 22.88 dB gap).  The reason:
the best blind-spot prediction shrinks the neighbours towards the mean,
E[x_c | N] = mu + w.(N - mu), which needs a constant term.  Scale equivariance is not
needed because every dataset is normalised (``emdenoise.train.Normalisation``) before
training and inference, so the network always sees intensities of order one.  A
bias-free model remains available with ``bias=False``.

Initialisation: each BCK channel starts as the mean of its neighbours (all non-centre
taps equal, perturbed by +-20 % to break the symmetry between channels, renormalised to
sum 1), the hidden 1x1 layers start as the identity plus small doubly-centred noise (biases
zero) and the output layer
averages the channels.  For non-negative input the untrained model is therefore a
mean-preserving "neighbour average" filter, which (a) avoids dead final ReLUs (a branch
whose output is negative everywhere never receives a gradient) and (b) makes the short
CPU training budget converge from a sensible starting point.
"""
from __future__ import annotations



import torch
import torch.nn.functional as F
from torch import nn

from .config import SHINEParams, WCVDParams
from .errors import InputError
from .filters import GATE_SLOPE
from .tiling import min_frames_for_windows, window_frames

__all__ = [
    "BlindSpotModel",
    "MODELS",
    "register",
    "model_class",
    "class_for_params",
    "WCVDParams",
    "BlindConv",
    "WCVD",
    "build_model",
    "check_blind_state",
    "resolve_device",
    "MixGate",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device={device!r} requested but CUDA is not available")
    return dev


def temporal_windows(x: torch.Tensor, k: int, name: str = "k") -> torch.Tensor:
    """(N, T, Y, X) -> (N*(T-k+1), k, Y, X): every window of k consecutive frames
    (valid temporal padding), shared by WCVD and SHINE."""
    if x.dim() != 4:
        raise ValueError(f"expected (N, T, Y, X) input, got shape {tuple(x.shape)}")
    n, t, y, xx = x.shape
    if t < k:
        raise ValueError(f"need at least {name}={k} frames, got {t}")
    if k == 1:
        return x.reshape(n * t, 1, y, xx)
    return x.unfold(1, k, 1).permute(0, 1, 4, 2, 3).reshape(n * (t - k + 1), k, y, xx)


# ======================================================================================
# The model interface and registry
# ======================================================================================
MODELS: dict[str, type] = {}


def register(*names: str):
    """Class decorator: make a :class:`BlindSpotModel` subclass reachable by ``names``
    (the value of ``model:`` in the config and of ``'model'`` in checkpoints)."""
    def deco(cls):
        for n in names:
            MODELS[n] = cls
        return cls
    return deco


def model_class(name: str) -> type:
    """The registered model class for a name ('wcvd', 'wcid', 'shine', ...)."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(None, f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def class_for_params(params) -> type:
    """The registered model class whose ``params_class`` is ``type(params)``."""
    for cls in MODELS.values():
        if isinstance(params, cls.params_class):
            return cls
    raise InputError(None, f"no registered model takes parameters of type {type(params).__name__}")


class BlindSpotModel(nn.Module):
    """What the training loop, the sampler, inference and the workflow need of a model.

    A blind-spot model maps sliding temporal windows to the centre frame without ever
    seeing the centre-frame pixels of its blind spot.  A subclass provides:

    - ``params_class``: a frozen dataclass with ``kt_eff`` (frames per input window,
      odd), ``halo_t`` (= kt_eff // 2, frames on each side), ``halo_s`` (receptive-field
      radius in px), ``blind_radius`` (b: centre-frame pixels within Chebyshev distance
      b of p are unseen; 0 = the pixel itself), ``to_dict`` / ``from_dict``;
    - ``forward(x, spatial_padding)``: x (N, T, Y, X) float32 normalised, T >= kt_eff;
      returns (N, T - kt_eff + 1, Y', X'), Y' = Y for 'circular' (whole frames, periodic
      padding) and Y - 2 halo_s for 'valid' (crops or tiles carrying a real-pixel halo);
    - ``check_state(state_dict, source, params)``: refuse weights that are not blind;
    - ``name(params)``: the registry name written into checkpoints;
    - ``optimiser`` ('adam' | 'radam') and ``warmup_fraction`` (linear warm-up over that
      fraction of all optimiser steps before the cosine / constant schedule).

    Training crops carry a real-pixel halo of ``halo_s`` px ('valid'), whole frames use
    periodic padding ('circular'), so training and inference see the same inputs.
    The input check (:meth:`check_input`) is shared: at least one window of frames and
    frames wider than the receptive field (a periodic wrap would otherwise fold a pixel
    into its own blind spot).
    """

    params_class: type = object
    checkpoint_format: str = "emdenoise-model/1"
    optimiser: str = "adam"
    warmup_fraction: float = 0.0
    #: CPU inference may run in bfloat16 where the CPU computes it natively
    #: (``infer.predict_windows(precision='auto')``); only for models whose output stays
    #: within 1e-3 of float32 (SHINE); WCVD's CPU fast path is float32
    cpu_bf16: bool = False

    @classmethod
    def build(cls, params, seed: int = 0) -> "BlindSpotModel":
        """A freshly initialised model; the same seed gives bit-identical weights.
        The caller's global torch RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return cls(params)

    @classmethod
    def name(cls, params) -> str:
        return next(n for n, c in MODELS.items() if c is cls)

    def initialise(self, sources: list, generator: torch.Generator) -> dict:
        """Data-driven start before training (default: none).  sources: (z, centres) per
        training stack, z (T, Y, X) normalised frames (a tensor or anything indexable by
        frames that gives arrays), centres: its training target frames.  Returns a record
        for the log."""
        return {}

    @classmethod
    def check_state(cls, state_dict: dict, source=None, params=None) -> None:
        raise NotImplementedError

    @classmethod
    def check_input(cls, params, shape, source=None) -> None:
        """InputError unless a (T, Y, X) stack of ``shape`` can be trained on / denoised."""
        if len(shape) != 3:
            raise InputError(source, f"expected a (T, Y, X) stack, got shape {tuple(shape)}")
        t, y, x = shape
        need = min_frames_for_windows(params.halo_t)  # windows continue past the movie's ends
        if t < need:
            raise InputError(source, f"{cls.name(params)} needs at least {need} frames "
                                     f"(its input window reaches {params.halo_t} on each side), got {t}")
        if min(y, x) <= 2 * params.halo_s:
            raise InputError(source, f"frames of {y}x{x} px are too small for {cls.name(params)}: its "
                                     f"receptive field is {2 * params.halo_s + 1} px; frames must be larger "
                                     f"than {2 * params.halo_s} px")


class BlindConv(nn.Module):
    """Blind convolution kernel (BCK): no bias, centre-frame blind spot zero, gradient masked.

    weight: (C, 1, kt, ks, ks) for dims=3 (the shape of an ``nn.Conv3d`` weight) or
    (C, 1, ks, ks) for dims=2.  The taps of the centre frame within Chebyshev distance
    ``blind_radius`` of the centre (the centre tap alone for 0) are kept at zero three
    ways: zero at initialisation, their gradient zeroed by a hook (as in the paper), and
    the forward pass multiplies the weight by a mask, so even a corrupted value has
    provably no influence on the output (d output / d blind input == 0 exactly).
    """

    def __init__(self, ks: int, kt: int, channels: int, dims: int,
                 generator: torch.Generator | None = None, blind_radius: int = 0, scale: float = 1.0):
        super().__init__()
        self.ks, self.kt, self.dims = ks, (kt if dims == 3 else 1), dims
        shape = (channels, 1, kt, ks, ks) if dims == 3 else (channels, 1, ks, ks)
        self.weight = nn.Parameter(torch.empty(shape))
        self.register_buffer("mask", blind_mask(shape, blind_radius), persistent=False)
        # Paper: "intercept the gradient ... set the corresponding element to 0".
        self.weight.register_hook(self._mask_grad)
        self.scale = float(scale)
        self.reset_parameters(generator)

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.to(grad.dtype)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Neighbour-average init (+-20 % jitter), blind taps exactly zero, sum ``scale``
        per channel."""
        w = 1.0 + 0.2 * (2.0 * torch.rand(self.weight.shape, generator=generator) - 1.0)
        w = w * self.mask
        w = self.scale * w / w.flatten(1).sum(1).view(-1, *([1] * (w.dim() - 1)))
        self.weight.copy_(w)

    def masked_weight(self) -> torch.Tensor:
        """Weight with the blind taps forced to zero, as a 2D-conv weight (C, kt, ks, ks)."""
        w = self.weight * self.mask
        c = w.shape[0]
        return w.reshape(c, self.kt, self.ks, self.ks)


def blind_mask(shape: tuple[int, ...], blind_radius: int) -> torch.Tensor:
    """Ones of a BCK weight's ``shape`` (C, 1, [kt,] ks, ks) with zeros on the centre
    frame's taps within Chebyshev distance ``blind_radius`` of the centre."""
    mask = torch.ones(shape)
    ks = shape[-1]
    c, b = ks // 2, min(int(blind_radius), ks // 2)
    sl = (slice(None), 0) + ((shape[2] // 2,) if len(shape) == 5 else ()) + (slice(c - b, c + b + 1),) * 2
    mask[sl] = 0.0
    return mask


def _pad_kernel(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a (C, kt, ks, ks) kernel to (C, kt, k, k), keeping it centred."""
    p = (k - w.shape[-1]) // 2
    return F.pad(w, (p, p, p, p)) if p else w


def _near_identity(c: int, generator: torch.Generator | None) -> torch.Tensor:
    """I + E with E small and doubly centred (zero row and column sums).

    Zero row sums keep equal channels equal (and positive, so LeakyReLU is the
    identity on them); zero column sums keep the channel average, so the untrained
    branch preserves the mean intensity.
    """
    e = 0.1 * torch.randn(c, c, generator=generator)
    e = e - e.mean(0, keepdim=True) - e.mean(1, keepdim=True) + e.mean()
    return torch.eye(c) + e


class _Branch(nn.Module):
    """One ensemble member: BCK (+ context kernel) -> N_L x (1x1, LeakyReLU) -> 1x1 -> ReLU.

    The 1x1(x1) convolutions are stored as per-pixel matrices (C_out, C_in).  With
    temporal context the context channels enter through ``ctx`` (C, n_ctx, ks, ks),
    unmasked: they hold no centre-frame pixel.  At initialisation the BCK and the widest
    context mean each carry half the weight, so the untrained branch still preserves the
    mean intensity.
    """

    def __init__(self, ks: int, p: WCVDParams, generator: torch.Generator | None):
        super().__init__()
        c = p.channels
        n_ctx = len(p.context_radii)
        self.bck = BlindConv(ks, p.kt, c, p.dims, generator, p.blind_radius, scale=0.5 if n_ctx else 1.0)
        if n_ctx:
            w = torch.zeros(c, n_ctx, ks, ks)
            w[:, 0, ks // 2, ks // 2] = 0.5
            self.ctx = nn.Parameter(w)
        else:
            self.ctx = None
        self.hidden_w = nn.ParameterList(
            [nn.Parameter(_near_identity(c, generator)) for _ in range(p.n_layers)])
        self.hidden_b = nn.ParameterList(
            [nn.Parameter(torch.zeros(c)) for _ in range(p.n_layers)] if p.bias else [])
        self.out_w = nn.Parameter(torch.full((1, c), 1.0 / c))
        self.out_b = nn.Parameter(torch.zeros(1)) if p.bias else None


#: Pixels the least-squares start of WCVD fits on (all of a smaller movie's training
#: frames; drawn evenly over them above).  Measured on 24 x 128² synthetic movies (quick
#: suite, WCVD + context, 100 epochs, PSNR vs truth): see WCVD.initialise and the README.
LS_PIXELS = 1_000_000


def _tap_orbits(n_in: int, kt: int, k: int) -> torch.Tensor:
    """(n_in, k, k) int64 orbit labels of the taps of a first-layer kernel under the
    dihedral group of the square (flips in y and x, transposition) and, for the first
    ``kt`` input channels (the frames of the window), time reversal t + d <-> t - d."""
    c = k // 2
    lab = torch.empty(n_in, k, k, dtype=torch.int64)
    for ch in range(n_in):
        ch_key = min(ch, kt - 1 - ch) if ch < kt else ch
        for i in range(k):
            for j in range(k):
                a, b = sorted((abs(i - c), abs(j - c)))
                lab[ch, i, j] = (ch_key * k + a) * k + b
    return lab


def context_means(x: torch.Tensor, halo: int, radii: tuple[int, ...]) -> torch.Tensor:
    """Temporal context: x (N, T, Y, X) -> (N, T - 2 halo, len(radii), Y, X); for the
    centre frame c = halo + j, channel i is the mean of frames c-r..c+r *without frame c*,
    r = radii[i] <= halo.  Summed outwards frame by frame, so a window and any block
    holding it give bit-identical values."""
    t = x.shape[1]
    out = [None] * len(radii)
    acc = torch.zeros_like(x[:, halo:t - halo])
    for d in range(1, max(radii) + 1):
        acc = acc + x[:, halo - d:t - halo - d] + x[:, halo + d:t - halo + d]
        for i, r in enumerate(radii):
            if r == d:
                out[i] = acc / (2 * d)
    return torch.stack(out, 2)


@register("wcvd", "wcid")
class WCVD(BlindSpotModel):
    """Ensemble of blind-spot branches; WCVD for ``dims=3``, WCID for ``dims=2``.

    forward(x): x (N, T, Y, X) float32, normalised intensities.  Returns
    (N, T - kt + 1, Y', X') with Y' = Y, X' = X for ``spatial_padding='circular'`` and
    Y' = Y - 2*halo_s, X' = X - 2*halo_s for ``'valid'`` (used to train on crops whose
    borders carry real neighbours).  For WCID (dims=2) every frame is denoised on its own
    and T is kept.
    """

    params_class = WCVDParams
    checkpoint_format = "emdenoise-wcvd/1"
    optimiser = "adam"

    def __init__(self, params: WCVDParams = WCVDParams(), generator: torch.Generator | None = None):
        super().__init__()
        self.params = params
        self.branches = nn.ModuleList([_Branch(k, params, generator) for k in params.ks])
        # Softmax over learned logits, as in the released code: the ensemble stays a
        # convex combination of the branches (>= 0 after their final ReLU, no branch
        # can enter with a negative weight); zeros = equal weights 1/n at the start.
        self.ensemble_logits = nn.Parameter(torch.zeros(len(params.ks)))

    @property
    def ensemble_weights(self) -> torch.Tensor:
        """(n_branches,) convex weights: softmax of ``ensemble_logits``."""
        return torch.softmax(self.ensemble_logits, 0)

    @classmethod
    def build(cls, params: WCVDParams = WCVDParams(), seed: int = 0) -> "WCVD":
        return cls(params, generator=torch.Generator().manual_seed(int(seed)))

    @classmethod
    def name(cls, params: WCVDParams) -> str:
        return "wcvd" if params.dims == 3 else "wcid"

    @classmethod
    def check_state(cls, state_dict: dict, source=None, params: WCVDParams | None = None) -> None:
        check_blind_state(state_dict, source, 0 if params is None else params.blind_radius)

    # -- shared pieces -------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, Y, X) -> (N*T', kt + n_ctx, Y, X), T' = T - kt_eff + 1: for every output
        frame the kt frames around it (the BCK's input) and the context means
        (:func:`context_means`), the input channels of :meth:`merged_input_weight`."""
        p = self.params
        if not p.context:
            return temporal_windows(x, p.kt_eff, "kt")
        t, h, k2 = x.shape[1], p.halo_t, p.kt // 2
        if t < p.kt_eff:
            raise ValueError(f"need at least kt={p.kt_eff} frames, got {t}")
        win = temporal_windows(x[:, h - k2:t - h + k2], p.kt, "kt")             # (N*T', kt, Y, X)
        ctx = context_means(x, h, p.context_radii).flatten(0, 1)                 # (N*T', n_ctx, Y, X)
        return torch.cat([win, ctx], 1)

    def _spatial_pad(self, w: torch.Tensor, spatial_padding: str) -> torch.Tensor:
        h = self.params.halo_s
        if spatial_padding == "circular":
            if min(w.shape[-2:]) <= 2 * h:
                # Wrapping a frame narrower than the kernel would fold the centre pixel
                # back into its own neighbourhood and break the blind spot.
                raise ValueError(f"frames must be larger than {2 * h} px for circular padding")
            return F.pad(w, (h, h, h, h), mode="circular")
        if spatial_padding == "valid":
            return w
        raise ValueError(f"spatial_padding must be 'circular' or 'valid', got {spatial_padding!r}")

    def merged_bck_weight(self) -> torch.Tensor:
        """All branch kernels, blind taps masked, zero-padded to Ks_max: (nb*C, kt, K, K)."""
        k = max(self.params.ks)
        return torch.cat([_pad_kernel(b.bck.masked_weight(), k) for b in self.branches], 0)

    def merged_input_weight(self) -> torch.Tensor:
        """The first convolution over :meth:`features`: (nb*C, kt + n_ctx, K, K), the
        masked BCKs followed by the (unmasked) context kernels."""
        w = self.merged_bck_weight()
        if not self.params.context:
            return w
        k = max(self.params.ks)
        return torch.cat([w, torch.cat([_pad_kernel(b.ctx, k) for b in self.branches], 0)], 1)

    # -- least-squares start ------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, sources: list, generator: torch.Generator, max_pixels: int = LS_PIXELS,
                   chunk: int = 32_768) -> dict:
        """Start every branch from the best *linear* blind-spot predictor on its support.

        The self-supervised loss is a least-squares problem for a linear model: the taps
        of the branch's blind kernel (+ context kernel) and an intercept that minimise
        the MSE between the prediction and the noisy centre pixel over the training
        frames' pixels -- all of them up to ``max_pixels``, else that many drawn evenly
        over the centres (no intercept with ``bias=False``; ridge 1e-6 of the mean
        diagonal).  Blind by construction -- the masked taps are not unknowns -- and,
        because those taps exclude the noise of the predicted pixel, the fit estimates
        the best linear denoiser on that support (Noise2Self), a data-tuned Wiener filter.
        Every channel of a branch starts from it (+-5 % jitter to break the symmetry),
        the intercept goes into the output bias, and SGD then learns the nonlinear part.
        On the synthetic counting movie this start is what makes a few hundred CPU steps
        enough (the neighbour-average start left the network below a tuned Gaussian).
        The normal equations are summed over ``chunk`` pixels at a time: memory does not
        grow with ``max_pixels`` (why it can be large: at low dose the signal's error is
        ~1 % of the noise variance, and each unknown fitted on n pixels adds ~1/n of it).
        sources: (z, centres) per training stack: z (T, Y, X) normalised float32 frames (a
        tensor, or indexable by frames giving arrays: read one window at a time), centres:
        the frames targets may come from.
        """
        p = self.params
        sources = [(z, list(c)) for z, c in sources if len(c)]
        n_centres = sum(len(c) for _, c in sources)
        if not n_centres:
            return {}
        kmax, h = max(p.ks), p.halo_t
        n_in = (p.kt if p.dims == 3 else 1) + len(p.context_radii)
        per = max(1, max_pixels // n_centres)
        fits = []  # per branch: its taps, their orbits, and the normal equations' sums
        for b in self.branches:
            k, o = b.bck.ks, (kmax - b.bck.ks) // 2
            sel = torch.zeros(n_in, kmax, kmax, dtype=torch.bool)
            sel[:, o:o + k, o:o + k] = True
            blind = (b.bck.mask.reshape(-1, b.bck.kt, k, k)[0] == 0)
            sel[:b.bck.kt, o:o + k, o:o + k] &= ~blind
            # one unknown per orbit of taps under the symmetries the training assumes
            # (flips / transposes: the dihedral group; time reversal of the kt frames):
            # ~8x fewer unknowns than taps, so the fit is not drowned in estimation noise
            orbit = _tap_orbits(n_in, b.bck.kt, kmax)[sel]                          # (n_sel,)
            uniq, inv = torch.unique(orbit, return_inverse=True)
            proj = torch.zeros(len(inv), len(uniq), dtype=torch.float64)
            proj[torch.arange(len(inv)), inv] = 1.0
            m = len(uniq) + (1 if p.bias else 0)  # + the intercept
            fits.append({"sel": sel.flatten(), "proj": proj, "n": len(uniq),
                         "g": torch.zeros(m, m, dtype=torch.float64), "r": torch.zeros(m, dtype=torch.float64)})
        dy = torch.arange(kmax)
        n_pixels = 0
        for z, centres in sources:
            for c in centres:
                win = torch.as_tensor(window_frames(z, c, h))                      # (kt_eff, Y, X)
                f = self.features(win[None])                                       # (1, n_in, Y, X)
                f = F.pad(f, (kmax // 2,) * 4, mode="circular")[0]
                yy, xx = win.shape[-2:]
                if per >= yy * xx:  # every pixel once
                    idx = torch.arange(yy * xx)
                else:
                    idx = torch.randint(0, yy * xx, (per,), generator=generator)
                for part in idx.split(chunk):
                    py, px = part // xx, part % xx
                    # (n_in * K * K, n): every tap of every pixel of the chunk
                    patch = f[:, py[None, None, :] + dy[:, None, None], px[None, None, :] + dy[None, :, None]]
                    patch = patch.reshape(n_in * kmax * kmax, -1)
                    y = win[h][py, px].double()
                    for fit in fits:
                        a = fit["proj"].T @ patch[fit["sel"]].double()
                        if p.bias:
                            a = torch.cat([a, torch.ones(1, a.shape[1], dtype=a.dtype)], 0)
                        fit["g"] += a @ a.T
                        fit["r"] += a @ y
                    n_pixels += len(part)
        record = {}
        for b, fit in zip(self.branches, fits):
            k, o, kt_in = b.bck.ks, (kmax - b.bck.ks) // 2, b.bck.kt
            g = fit["g"] + 1e-6 * fit["g"].diagonal().mean() * torch.eye(len(fit["g"]), dtype=torch.float64)
            sol = torch.linalg.solve(g, fit["r"])
            w = torch.zeros(n_in * kmax * kmax, dtype=torch.float64)
            w[fit["sel"]] = fit["proj"] @ sol[:fit["n"]]
            w = w.reshape(n_in, kmax, kmax)[:, o:o + k, o:o + k].float()
            c = p.channels
            jitter = 1.0 + 0.05 * (2.0 * torch.rand((c,) + tuple(w.shape), generator=generator) - 1.0)
            wc = w[None] * jitter                                                  # (C, n_in, k, k)
            b.bck.weight.copy_((wc[:, :kt_in] * b.bck.mask.reshape(c, kt_in, k, k)).reshape(b.bck.weight.shape))
            if b.ctx is not None:
                b.ctx.copy_(wc[:, kt_in:])
            if b.out_b is not None:
                b.out_b.fill_(float(sol[-1]))
            record[f"ks{k}"] = {"taps": int(fit["sel"].sum()), "unknowns": fit["n"]}
        return {"linear_start": record, "pixels": n_pixels}

    # -- fast merged forward (training and GPU inference) --------------------------
    def forward(self, x: torch.Tensor, spatial_padding: str = "circular") -> torch.Tensor:
        p = self.params
        n, t = x.shape[:2]
        w = self._spatial_pad(self.features(x), spatial_padding)
        if w.device.type == "cpu":
            w = w.contiguous(memory_format=torch.channels_last)
        h = F.conv2d(w, self.merged_input_weight())                   # (M, nb*C, Y, X)
        # The per-branch 1x1 layers as one dense 1x1 convolution with a block-diagonal weight
        # (the zeros keep the branches apart, and the sums are the same): oneDNN runs it
        # faster than the grouped convolution with 3 channels per group, most of all in the
        # backward pass (training steps/s +45 % WCVD, +31 % with context; bench/bench_speed.py).
        for layer in range(p.n_layers):
            wl = torch.block_diag(*[b.hidden_w[layer] for b in self.branches])[:, :, None, None]
            bl = torch.cat([b.hidden_b[layer] for b in self.branches]) if p.bias else None
            h = F.leaky_relu(F.conv2d(h, wl, bl), p.negative_slope)
        wo = torch.block_diag(*[b.out_w for b in self.branches])[:, :, None, None]  # (nb, nb*C, 1, 1)
        bo = torch.cat([b.out_b for b in self.branches]) if p.bias else None
        o = F.relu(F.conv2d(h, wo, bo))                              # (M, nb, Y, X)
        o = torch.einsum("mbyx,b->myx", o, self.ensemble_weights.to(o.dtype))
        return o.reshape(n, t - p.kt_eff + 1, *o.shape[-2:])

    # -- literal paper formulation, for tests ------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Per-branch Conv3d (dims=3) / Conv2d (dims=2) with circular spatial padding;
        the context means written out frame by frame with a per-branch Conv2d.

        Slow and literal; same contract as ``forward(x, 'circular')``.
        """
        p = self.params
        n, t, yy, xx = x.shape
        h_t, k2 = p.halo_t, (p.kt // 2 if p.dims == 3 else 0)
        outs = []
        for b in self.branches:
            h_s = b.bck.ks // 2
            wgt = b.bck.weight * b.bck.mask
            if p.dims == 3:
                xi = F.pad(x[:, None, h_t - k2:t - h_t + k2], (h_s, h_s, h_s, h_s, 0, 0), mode="circular")
                h = F.conv3d(xi, wgt)                                    # (N, C, T', Y, X)
                h = h.permute(0, 2, 1, 3, 4).reshape(-1, p.channels, yy, xx)
            else:
                xi = F.pad(x.reshape(n * t, 1, yy, xx), (h_s,) * 4, mode="circular")
                h = F.conv2d(xi, wgt)
            if p.context:
                ctx = []
                for i in range(n):
                    for c in range(h_t, t - h_t):
                        ctx.append(torch.stack([(x[i, c - r:c + r + 1].sum(0) - x[i, c]) / (2 * r)
                                                for r in p.context_radii]))
                ctx = F.pad(torch.stack(ctx), (h_s,) * 4, mode="circular")
                h = h + F.conv2d(ctx, b.ctx)
            for layer in range(p.n_layers):
                bias = b.hidden_b[layer] if p.bias else None
                h = F.leaky_relu(F.conv2d(h, b.hidden_w[layer][:, :, None, None], bias), p.negative_slope)
            outs.append(F.relu(F.conv2d(h, b.out_w[:, :, None, None], b.out_b)))
        o = sum(a * oi for a, oi in zip(self.ensemble_weights, outs))
        return o.reshape(n, t - p.kt_eff + 1, yy, xx)


def build_model(params: WCVDParams = WCVDParams(), seed: int = 0) -> WCVD:
    """A freshly initialised WCVD / WCID; the same seed gives bit-identical weights."""
    return WCVD.build(params, seed)


def check_blind_state(state_dict: dict, source=None, blind_radius: int = 0) -> None:
    """Refuse weights whose BCK blind taps (centre frame, within ``blind_radius`` of the
    centre) are not exactly zero.

    state_dict: a ``WCVD.state_dict()``; source: file name for the error message.
    Raises ``InputError(source, 'centre weight of the blind kernel is not zero ...')``.
    A non-zero centre means the weights did not come from a blind-spot training run (or
    were edited): such a model may have learned the identity and would return the noise.
    """
    keys = [k for k in state_dict if k.endswith("bck.weight")]
    if not keys:
        raise InputError(source, "no blind convolution kernel weights (*.bck.weight) in the model state")
    for k in keys:
        w = state_dict[k]
        centre = w[blind_mask(tuple(w.shape), blind_radius) == 0]
        if torch.count_nonzero(centre).item():
            worst = float(centre.abs().max())
            raise InputError(
                source,
                f"centre weight of the blind kernel is not zero ({k}: max |w| = {worst:.3g}); "
                "refusing to load a model that can see the pixel it predicts",
            )


# ======================================================================================
# SHINE: efficient blind-spot video denoiser with dilated convolutions
# ======================================================================================
# SHINE paper (Materials and Methods, fig. S1) after Honzatko et al. 2020, "Efficient
# blind-spot neural network architecture for image denoising".  Layout:
#
#   window (N, 5, Y, X) = frames t-2 .. t+2
#   centre frame t   -> 1x1 conv -> 48 ch  (centre-frame radius 0)      } concat, LeakyReLU
#   frames t+-1, t+-2 -> 3x3 conv -> 16 ch  (neighbour-frame radius 1)  } = f_0
#   f_i = f_{i-1} + conv3x3(act(conv3x3(f_{i-1}))), i = 1..B (B = 8)    residual blocks
#   g_i = dilated 3x3 conv of f_i, dilation d_i = r_i + b + 1, CENTRE TAP REMOVED
#   neighbour path: 3x3 conv of the neighbour features (never sees frame t)
#   out = 1x1 head( act( sum_i g_i + neighbour path ) )                 per pixel
#         + s * mean(neighbour frames at p)     s learned, starts at 1; the head starts small
#
# Why the blind spot is exact (b = blindspot // 2, Chebyshev distances):
# - f_i(q) depends on centre-frame pixels within r_i = 2 i of q: the centre frame
#   enters through a 1x1 convolution (radius 0) and each block adds two 3x3 convs.
# - g_i(p) reads f_i only at p + d_i (a, c) with (a, c) != (0, 0), i.e. at distance
#   >= d_i from p, so it depends on centre pixels at distance >= d_i - r_i = b + 1.
# - the neighbour path and the head (1x1) add no centre-frame dependence.
# Hence d out(p) / d x_t(q) == 0 exactly for |q - p| <= b.  The centre tap is removed by
# a fixed mask multiplied into the weight in every forward pass (so even a corrupted
# state cannot break it), and ``check_shine_state`` refuses weights whose centre is not 0.
# Neighbour frames carry independent noise, so they may (and do) reach p itself.
#
# Coverage: for blocks with r_i >= b the taps of g_i tile the ring b < |q - p| <= d_i + r_i
# without gaps (d_i <= 2 r_i + 1), so every centre pixel outside the blind spot within the
# receptive field is seen.
#
# Spatial padding: 'zeros' pads every convolution with zeros (same size out; used for
# training on crops, as in the paper); 'circular' wraps the input once by halo_s px and
# then runs 'valid'; 'valid' returns Y - 2 halo_s rows (tiles with a halo give the same
# pixels as whole-frame circular inference).  Zero padding carries no information and a
# wrap by halo_s needs frames wider than 2 halo_s, so neither can fold a centre pixel
# back into its own blind spot.


__all__ += ["SHINEParams", "SHINE", "build_shine", "check_shine_state", "build_any"]


def _crop(h: torch.Tensor, m: int) -> torch.Tensor:
    """Remove m px from each spatial border of (N, C, Y, X)."""
    return h[..., m:h.shape[-2] - m, m:h.shape[-1] - m] if m else h


@register("shine")
class SHINE(BlindSpotModel):
    """SHINE blind-spot network.

    forward(x, spatial_padding='circular'): x (N, T, Y, X) float32 normalised frames,
    T >= frames.  Sliding windows of ``frames`` frames (valid temporal padding) give
    (N, T - frames + 1, Y', X'): Y' = Y for 'zeros' / 'circular', Y - 2 halo_s for 'valid'.
    """

    params_class = SHINEParams
    checkpoint_format = "emdenoise-shine/1"
    optimiser = "radam"  # SHINE paper: RAdam with warm-up and cosine annealing
    warmup_fraction = 0.05  # the paper names a warm-up without its length
    #: CPU inference may run in bfloat16 where the CPU has native bf16 (AMX / AVX512-BF16;
    #: ``infer.precision: auto``): ~4-6x faster, output within 1e-3 of float32 relative to
    #: its maximum (tests/test_infer.py measures it on a trained model)
    cpu_bf16 = True

    @classmethod
    def check_state(cls, state_dict: dict, source=None, params=None) -> None:
        check_shine_state(state_dict, source)

    def __init__(self, params: SHINEParams = SHINEParams()):
        super().__init__()
        p = self.params = params
        c = p.channels
        self.centre = nn.Conv2d(1, p.centre_channels, 1)
        self.neigh = nn.Conv2d(p.frames - 1, p.neighbour_channels, 3)
        self.stem = nn.Conv2d(p.centre_channels + p.neighbour_channels, c, 1)  # -> block width
        self.block_a = nn.ModuleList([nn.Conv2d(c, c, 3) for _ in range(p.blocks)])
        self.block_b = nn.ModuleList([nn.Conv2d(c, c, 3) for _ in range(p.blocks)])
        self.collect = nn.ModuleList([nn.Conv2d(c, c, 3, bias=(i == 0)) for i in range(p.blocks)])
        self.neigh_path = nn.Conv2d(p.neighbour_channels, c, 3)
        self.head = nn.ModuleList([nn.Conv2d(c, c, 1) for _ in range(p.head_layers)])
        self.out = nn.Conv2d(c, 1, 1)
        # Learned weight of the neighbour-frame mean at p, added to the output: the
        # untrained model is then a 4-frame temporal average instead of noise around 0,
        # which short CPU trainings need; it never involves the centre frame.
        self.neighbour_skip = nn.Parameter(torch.ones(1))
        with torch.no_grad():  # small (not zero: every path must carry a gradient)
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
        mask = torch.ones(1, 1, 3, 3)
        mask[..., 1, 1] = 0.0
        self.register_buffer("collect_mask", mask, persistent=False)
        with torch.no_grad():
            for conv in self.collect:
                conv.weight.mul_(mask)
            # Residual blocks start close to the identity: keeps 8 blocks trainable from
            # scratch with few steps (CPU budgets) without changing the receptive field.
            for conv in self.block_b:
                conv.weight.mul_(0.1)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(h, self.params.negative_slope)

    def _conv(self, h: torch.Tensor, conv: nn.Conv2d, pad: bool, dilation: int = 1,
              weight: torch.Tensor | None = None) -> torch.Tensor:
        w = conv.weight if weight is None else weight
        if h.device.type == "cpu":  # oneDNN: channels-last 3x3 convs run ~2x faster, and the
            h = h.contiguous(memory_format=torch.channels_last)  # crops / concatenations break it
        r = dilation * (w.shape[-1] // 2)
        return F.conv2d(h, w, conv.bias, padding=r if pad else 0, dilation=dilation)

    def _windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, Y, X) -> centre (M, 1, Y, X) and neighbours (M, frames-1, Y, X)."""
        k = self.params.frames
        w = temporal_windows(x, k, "frames")
        h = k // 2
        return w[:, h:h + 1], torch.cat([w[:, :h], w[:, h + 1:]], 1)

    def forward(self, x: torch.Tensor, spatial_padding: str = "circular") -> torch.Tensor:
        p = self.params
        n, t = x.shape[:2]
        if spatial_padding == "circular":
            hs = p.halo_s
            if min(x.shape[-2:]) <= 2 * hs:
                raise ValueError(f"frames must be larger than {2 * hs} px for circular padding "
                                 f"(receptive-field radius {hs} px); use spatial_padding='zeros'")
            x = F.pad(x, (hs, hs, hs, hs), mode="circular")
            spatial_padding = "valid"
        if spatial_padding not in ("zeros", "valid"):
            raise ValueError(f"spatial_padding must be 'zeros', 'circular' or 'valid', got {spatial_padding!r}")
        pad = spatial_padding == "zeros"
        centre, neigh = self._windows(x)
        if x.device.type == "cpu":  # oneDNN runs 3x3 convolutions faster channels-last
            centre = centre.contiguous(memory_format=torch.channels_last)
            neigh = neigh.contiguous(memory_format=torch.channels_last)
        # margin m: px by which a feature map exceeds the output on each side ('valid')
        m = 0 if pad else p.halo_s
        fn = self._conv(neigh, self.neigh, pad)                   # neighbour radius 1
        mn = 0 if pad else m - 1
        fc = _crop(self.centre(centre), m - mn)                   # align with fn
        f = self._conv(self._act(torch.cat([fc, fn], 1)), self.stem, pad)
        mf = mn
        acc = self._conv(self._act(fn), self.neigh_path, pad)      # never sees frame t
        acc = _crop(acc, 0 if pad else mn - 1)
        for i in range(p.blocks):
            h = self._conv(self._act(self._conv(f, self.block_a[i], pad)), self.block_b[i], pad)
            mf = mf if pad else mf - 2
            f = _crop(f, 0 if pad else 2) + h
            d = p.dilation(i + 1)
            wc = self.collect[i].weight * self.collect_mask.to(f.dtype)
            g = self._conv(self._act(f), self.collect[i], pad, dilation=d, weight=wc)
            acc = acc + _crop(g, 0 if pad else mf - d)
        h = self._act(acc)
        for conv in self.head:
            h = self._act(conv(h))
        o = self.out(h)[:, 0] + self.neighbour_skip * _crop(neigh, m).mean(1)
        return o.reshape(n, t - p.frames + 1, *o.shape[-2:]).contiguous()


def build_shine(params: SHINEParams = SHINEParams(), seed: int = 0) -> SHINE:
    """A freshly initialised SHINE; the same seed gives bit-identical weights."""
    return SHINE.build(params, seed)


def build_any(params, seed: int = 0) -> BlindSpotModel:
    """A freshly initialised model of the registered class that takes ``params``."""
    return class_for_params(params).build(params, seed)


def check_shine_state(state_dict: dict, source=None) -> None:
    """Refuse SHINE weights whose collection convolutions have a non-zero centre tap.

    The forward pass masks the centre anyway; a non-zero centre means the weights were
    not produced by this code (or were edited) and are not trusted.
    Raises ``InputError(source, 'centre weight of a collection convolution is not zero ...')``.
    """
    keys = [k for k in state_dict if k.startswith("collect.") and k.endswith(".weight")]
    if not keys:
        raise InputError(source, "no SHINE collection convolution weights (collect.*.weight) in the model state")
    for k in keys:
        centre = state_dict[k][..., 1, 1]
        if torch.count_nonzero(centre).item():
            raise InputError(source, f"centre weight of a collection convolution is not zero ({k}: "
                             f"max |w| = {float(centre.abs().max()):.3g}); refusing to load a model "
                             "that can see the pixel it predicts")


# Temporal edges (all models): T frames in, T frames out.  Output frame t is predicted
# from frames t-h..t+h; a frame outside the movie is replaced by its mirror image about
# the centre frame (``tiling.window_index``): frame 0 gets (2, 1, 0, 1, 2), frame 1
# gets (3, 0, 1, 2, 3).  The centre frame never appears among its own neighbours, so
# the blind spot stays exact at the edges (tests/test_blindness.py audits every frame).


class MixGate(nn.Module):
    """The gate of the Gaussian mix (``filters.mix_gate_predict``, which applies it with
    NumPy): per-pixel coefficients for the mix's K blind Gaussian outputs.

    forward(f, x): f (n, K) scaled dictionary outputs, x (n, K + 1) the same and the
    standardised structure map -> (n,) scaled prediction sum_k (a_k + g_k(x)) f_k + c,
    g an MLP K + 1 -> hidden -> hidden -> K (LeakyReLU).  Not a blind-spot model by its
    own construction: it is blind because every input is (the dictionary's outputs are
    J-invariant, the structure map never reads frame t) and it mixes them pixel by pixel.
    The last layer starts at zero, so the untrained gate is the linear mix (a, c).
    """

    def __init__(self, n_features: int, hidden: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        k = int(n_features)
        self.lin = nn.Linear(k, 1)
        self.l1, self.l2, self.l3 = nn.Linear(k + 1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, k)
        with torch.no_grad():
            for layer in (self.lin, self.l1, self.l2):
                bound = 1.0 / layer.in_features ** 0.5  # torch's default range, from our generator
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
            self.l3.weight.zero_()
            self.l3.bias.zero_()

    def forward(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.l1(x), GATE_SLOPE)
        h = F.leaky_relu(self.l2(h), GATE_SLOPE)
        return self.lin(f)[:, 0] + (self.l3(h) * f).sum(1)

    @classmethod
    def from_export(cls, w: dict, hidden: int) -> "MixGate":
        """The module holding the weights :meth:`export` wrote."""
        net = cls(len(w["lin_w"]), hidden)
        with torch.no_grad():
            for layer, name in ((net.l1, "1"), (net.l2, "2"), (net.l3, "3")):
                layer.weight.copy_(torch.tensor(w["w" + name]))
                layer.bias.copy_(torch.tensor(w["b" + name]))
            net.lin.weight.copy_(torch.tensor([w["lin_w"]]))
            net.lin.bias.fill_(w["lin_b"])
        return net

    def export(self) -> dict:
        """The weights as JSON-able lists (what ``filters.mix_gate_predict`` reads)."""
        def v(t):
            return t.detach().cpu().double().tolist()
        return {"w1": v(self.l1.weight), "b1": v(self.l1.bias), "w2": v(self.l2.weight), "b2": v(self.l2.bias),
                "w3": v(self.l3.weight), "b3": v(self.l3.bias), "lin_w": v(self.lin.weight[0]),
                "lin_b": float(self.lin.bias.item())}
