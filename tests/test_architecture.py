"""The library's shape: an acyclic, layered import graph, and a model interface through
which a third blind-spot model needs no change outside its class and registry line."""
import ast
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import emdenoise
import emdenoise.chunked as chunked
import emdenoise.infer as infer
from emdenoise import io
from emdenoise.checkpoint import model_from_checkpoint
from emdenoise.config import TrainParams
from emdenoise.errors import InputError
from emdenoise.models import MODELS, BlindSpotModel, register, temporal_windows
from emdenoise.train import train_model
from test_blindness import CKPT, _paths, audit, random_model

PACKAGE = Path(emdenoise.__file__).parent

#: Each module may import only modules of a lower layer: the graph is acyclic by
#: construction, and the low layers (pure NumPy / SciPy stages) never pull in torch.
LAYERS = {
    0: {"__init__", "errors"},
    0.5: {"vendor"},  # instrument-format readers; io wraps them
    1: {"config", "io", "tiling", "filters", "metrics", "noise", "drift", "synthetic", "stage"},
    2: {"models", "report", "provenance"},
    3: {"checkpoint"},
    4: {"train", "infer"},
    5: {"chunked", "watch"},
    5.5: {"pipeline"},  # the chain: streams the WCID pre-filter through chunked inference
    6: {"cli"},
}
RANK = {m: r for r, mods in LAYERS.items() for m in mods}
NO_TORCH = LAYERS[1]
#: The one exception to "imports at module level": pipeline imports the torch side inside
#: the functions that train or apply a network, so the workflow's post-processing jobs
#: (lowpass, select, metrics, classical) start without torch (~1.5 s each).
DEFERRED = {"pipeline": {"checkpoint", "chunked", "infer", "models", "train"}}


def package_imports(path: Path) -> tuple[set[str], list[str]]:
    """(package modules imported at module level, package imports inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []

    def names(node):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("emdenoise"):
                mod = (node.module or "").removeprefix("emdenoise").lstrip(".")
                if mod:
                    return [mod.split(".")[0]]
                return [a.name for a in node.names]
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] for a in node.names if a.name.startswith("emdenoise.")]
        return []

    for node in tree.body:
        top.update(names(node))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                nested += [f"{path.stem}.{fn.name} imports {n}" for n in names(node)
                           if n not in DEFERRED.get(path.stem, ())]
    return {("__init__" if n == "__version__" else n) for n in top}, nested


def third_party_imports(path: Path) -> set[str]:
    return {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
            for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph (as a list of nodes), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_every_module_has_a_layer():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(RANK), "add the new module to LAYERS"


def test_imports_are_layered_acyclic_and_at_module_level():
    graph, problems = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        top, nested = package_imports(path)
        graph[path.stem] = top - {path.stem}
        problems += nested
        for m in top - {path.stem, "__init__"}:
            if RANK[m] >= RANK[path.stem]:
                problems.append(f"{path.stem} (layer {RANK[path.stem]}) imports {m} (layer {RANK[m]})")
        if path.stem in NO_TORCH and "torch" in third_party_imports(path):
            problems.append(f"{path.stem} imports torch")
    assert find_cycle(graph) is None
    assert not problems, "\n".join(problems)


def test_the_chain_and_the_post_processing_modules_import_without_torch():
    code = ("import sys, emdenoise.pipeline, emdenoise.report, emdenoise.metrics, emdenoise.filters; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # and the deferred imports are the torch side, of a lower layer
    for mod, deferred in DEFERRED.items():
        assert all(RANK[m] < RANK[mod] for m in deferred)


def test_the_layering_check_detects_a_cycle(tmp_path):
    # what the test above reports if tiling imported infer again (the old hidden cycle)
    fake = tmp_path / "tiling.py"
    fake.write_text("from .errors import InputError\n\ndef f():\n    from .infer import predict_block\n")
    top, nested = package_imports(fake)
    assert nested == ["tiling.f imports infer"]
    cyclic = {"infer": {"tiling"}, "tiling": {"infer"}}
    assert find_cycle(cyclic) == ["infer", "tiling", "infer"]
    assert find_cycle({"infer": {"tiling"}, "tiling": set()}) is None


# ------------------------------------------------------------------- a third model
@dataclass(frozen=True)
class ToyParams:
    """A 2D blind-spot network: one 5 x 5 convolution with the centre tap removed."""

    channels: int = 4
    kt_eff = 1
    halo_t = 0
    halo_s = 2
    blind_radius = 0

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Toy(BlindSpotModel):
    params_class = ToyParams

    def __init__(self, params=ToyParams()):
        super().__init__()
        self.params = params
        self.conv = torch.nn.Conv2d(1, params.channels, 5)
        self.out = torch.nn.Conv2d(params.channels, 1, 1)
        mask = torch.ones(1, 1, 5, 5)
        mask[..., 2, 2] = 0
        self.register_buffer("mask", mask, persistent=False)

    @classmethod
    def check_state(cls, state_dict, source=None, params=None):
        if torch.count_nonzero(state_dict["conv.weight"][..., 2, 2] * 0 + state_dict["conv.weight"][..., 2, 2]):
            raise InputError(source, "centre weight is not zero")

    def forward(self, x, spatial_padding="circular"):
        n, t = x.shape[:2]
        w = temporal_windows(x, 1)
        if spatial_padding == "circular":
            w = F.pad(w, (2, 2, 2, 2), mode="circular")
        h = F.relu(F.conv2d(w, self.conv.weight * self.mask, self.conv.bias))
        o = self.out(h)[:, 0]
        return o.reshape(n, t, *o.shape[-2:])

    def state_dict(self, *a, **kw):  # stored blind: the centre tap is zero in the file too
        sd = super().state_dict(*a, **kw)
        sd["conv.weight"] = sd["conv.weight"] * self.mask
        return sd


@pytest.fixture
def toy_registered():
    register("toy")(Toy)  # the model's one registry line
    yield
    MODELS.pop("toy")


def test_a_third_model_trains_infers_and_passes_the_audit(toy_registered, tmp_path):
    rng = np.random.default_rng(0)
    stack = (5 + rng.poisson(3.0, (6, 40, 40))).astype(np.float32)
    ckpt = train_model(stack, ToyParams(), TrainParams(epochs=2, crop=16, val_crop=16, device="cpu"))
    assert ckpt["model"] == "toy" and ckpt["window"] == 1
    model = model_from_checkpoint(ckpt)
    assert isinstance(model, Toy)
    whole = infer.denoise(model, ckpt, stack, device="cpu")
    io.write_zarr(tmp_path / "s.zarr", stack, chunks=(2, 16, 16))
    chunked.infer_zarr(model, ckpt, tmp_path / "s.zarr", tmp_path / "d.zarr", device="cpu", tile=(2, 16, 16),
                       workers=2, progress=False)
    np.testing.assert_allclose(io.read_zarr(tmp_path / "d.zarr")[0][:], whole, rtol=1e-5, atol=1e-5)
    tiled = infer.denoise_tiled(model, ckpt, stack, tile=24, overlap=8, device="cpu")
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
    toy = random_model(ToyParams())
    for name, run in _paths(toy, tmp_path).items():
        assert not audit(toy, run, 24, np.random.default_rng(2)), name
    assert CKPT
