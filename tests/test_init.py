"""Head initialization (`clipsam_jax/models/init.py`): PyTorch's layer defaults by default,
Flax's behind `--init flax` (docs/method.md §3.3)."""

from __future__ import annotations

import hashlib

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from scipy.stats import ks_2samp

from clipsam_jax import torch_ref
from clipsam_jax.config import HeadConfig
from clipsam_jax.models.heads import build_head
from clipsam_jax.models.init import init_params
from clipsam_jax.models.layers import Conv1D
from conversion.head_params import torch_to_flax

# One stage wide enough that every UMCI bias has >= 256 entries (mlp_out's 2 aside).
FEATURE_DIM, TEXT_DIM, HIDDEN_DIM, GRID = 320, 192, 256, 9
GATES = ("ir", "iz", "in", "hr", "hz", "hn")
KS_MIN_SIZE = 200  # tensors this large get a two-sample Kolmogorov-Smirnov test
KS_P_MIN = 1e-3


def torch_gru_as_flax(cell: torch.nn.GRUCell) -> dict:
    """torch.nn.GRUCell params in Flax GRUCell's tree. torch: r = σ(W_ir x + b_ir + W_hr h + b_hr),
    z likewise, n = tanh(W_in x + b_in + r (W_hn h + b_hn)); Flax has no hr / hz bias, so
    ir/bias = b_ir + b_hr and iz/bias = b_iz + b_hz, while in/bias = b_in and hn/bias = b_hn."""
    h = cell.hidden_size
    w_ih, w_hh = cell.weight_ih.detach().numpy(), cell.weight_hh.detach().numpy()
    b_ih, b_hh = cell.bias_ih.detach().numpy(), cell.bias_hh.detach().numpy()
    params = {}
    for k, gate in enumerate("rzn"):  # torch stacks the gates r, z, n along the rows
        rows = slice(k * h, (k + 1) * h)
        params[f"i{gate}"] = {"kernel": w_ih[rows].T}
        params[f"h{gate}"] = {"kernel": w_hh[rows].T}
    params["ir"]["bias"] = b_ih[:h] + b_hh[:h]
    params["iz"]["bias"] = b_ih[h : 2 * h] + b_hh[h : 2 * h]
    params["in"]["bias"] = b_ih[2 * h :]
    params["hn"]["bias"] = b_hh[2 * h :]
    return params


def test_torch_gru_bias_folding_is_exact():
    """The map above is torch's GRUCell in Flax's equations (so its folded biases are the
    quantities our GRU biases stand for)."""
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(5, 5)
    rng = np.random.default_rng(0)
    x, h = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(2))
    theirs = cell(torch.from_numpy(x), torch.from_numpy(h)).detach().numpy()
    ours, _ = nn.GRUCell(5).apply({"params": torch_gru_as_flax(cell)}, jnp.asarray(h), x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def torch_reference(kind: str) -> dict[tuple[str, ...], tuple[np.ndarray, float, bool]]:
    """Flax path → (a draw of torch's default init in Flax layout, the bound of one uniform,
    whether the quantity is a sum of two such uniforms). Linear / Conv params come from the
    PyTorch twin (bound 1/sqrt(fan_in) from torch's own weight); GRU params from
    torch.nn.GRUCell (the twin's GRUCell leaves out b_hr and b_hz: Flax's equations)."""
    torch.manual_seed(0)
    if kind == "aprilgan":
        twin = torch_ref.AprilGanHead(1, FEATURE_DIM, TEXT_DIM)
    else:
        twin = torch_ref.UMCIHead(1, feature_dim=FEATURE_DIM, text_dim=TEXT_DIM,
                                  hidden_dim=HIDDEN_DIM)  # fmt: skip
    state = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
    flat = flatten_dict(torch_to_flax(state))
    out = {}
    for path, value in flat.items():
        if "gru" in path:
            continue
        fan_in = state[".".join(("stages", "0", *path[1:-1], "weight"))][0].size
        out[path] = (value, 1.0 / np.sqrt(fan_in), False)
    for seed, strip in enumerate(sorted({p[:-2] for p in flat if "gru" in p}), start=1):
        torch.manual_seed(seed)
        gru = flatten_dict(torch_gru_as_flax(torch.nn.GRUCell(HIDDEN_DIM, HIDDEN_DIM)))
        for (gate, leaf), value in gru.items():
            folded = leaf == "bias" and gate in ("ir", "iz")
            out[(*strip, gate, leaf)] = (value, 1.0 / np.sqrt(HIDDEN_DIM), folded)
    return out


@pytest.mark.parametrize("kind", ["umci", "aprilgan"])
def test_pytorch_init_matches_torch_default_distributions(kind):
    head = build_head(HeadConfig(kind=kind, hidden_dim=HIDDEN_DIM), TEXT_DIM, num_stages=1)
    ours = flatten_dict(init_params(head, 0, [(1, GRID, GRID, FEATURE_DIM)], (1, 2, TEXT_DIM)))
    reference = torch_reference(kind)
    assert sorted(ours) == sorted(reference)
    gru_biases = [p for p in ours if "gru" in p and p[-1] == "bias"]
    assert len(gru_biases) == (8 if kind == "umci" else 0)  # ir, iz, in, hn of two strips
    for path, value in ours.items():
        theirs, bound, folded = reference[path]
        name, size = "/".join(path), value.size
        assert value.shape == theirs.shape and value.dtype == np.float32, name
        # Support: U(±b), or [-2b, 2b] for a sum of two (float32 rounding aside).
        limit = (2 if folded else 1) * bound * (1 + 1e-6)
        assert np.abs(value).max() <= limit and np.abs(theirs).max() <= limit, name
        # Std of U(±b) is b/sqrt(3), of the sum of two 2b/sqrt(6); the sample std's standard
        # error is below sigma·sqrt(0.35/n) for both (kurtosis 1.8 and 2.4), allow 5 of them.
        sigma = bound * np.sqrt((2 if folded else 1) / 3)
        for sample in (value, theirs):
            assert abs(sample.std() - sigma) <= 5 * sigma * np.sqrt(0.35 / size), name
        if size >= KS_MIN_SIZE:
            # Close to the bound: P(max |w| < b(1 - 20/n)) = (1 - 20/n)^n < e^-20 for U(±b),
            # and P(max |w| < 2b(1 - e)) = (1 - e²)^n < e^-25 for the sum with e = 5/sqrt(n).
            slack = 5 / np.sqrt(size) if folded else 20 / size
            assert np.abs(value).max() >= limit / (1 + 1e-6) * (1 - slack), name
            pvalue = ks_2samp(value.ravel(), theirs.ravel()).pvalue
            assert pvalue > KS_P_MIN, f"{name}: KS p = {pvalue:.2g}"
        if folded:  # a single U(±b) would never leave [-b, b]; the sum does a quarter of the time
            assert (np.abs(value) > bound).mean() > 0.1, name


class TinyHead(nn.Module):
    """A Dense with fan-in 4 and a 3-tap Conv1D with fan-in 3·4 = 12 in the heads' signature."""

    @nn.compact
    def __call__(self, tokens, text):
        return [nn.Dense(3, name="dense")(tokens[0]), Conv1D(2, 3, name="conv")(text)]


def test_tiny_dense_and_conv_bounds_hand_computed():
    shapes = ([(1, 2, 2, 4)], (1, 2, 4))
    params = init_params(TinyHead(), 5, *shapes)
    dense, conv = params["dense"], params["conv"]
    assert dense["kernel"].shape == (4, 3) and conv["kernel"].shape == (3, 4, 2)
    for leaf in (dense["kernel"], dense["bias"]):  # U(±1/sqrt(4)) = U(±0.5)
        assert np.abs(leaf).max() <= 0.5 and np.abs(leaf).max() > 0.05
    for leaf in (conv["kernel"], conv["bias"]):  # U(±1/sqrt(12)) = U(±0.2887)
        assert np.abs(leaf).max() <= 1 / np.sqrt(12) + 1e-7
    # Drawn in sorted path order from one generator: conv bias, conv kernel, dense bias, ...
    rng = np.random.default_rng(5)
    expected = [rng.uniform(-b, b, s) for b, s in [(12**-0.5, (2,)), (12**-0.5, (3, 4, 2)),
                                                  (0.5, (3,)), (0.5, (4, 3))]]  # fmt: skip
    got = [conv["bias"], conv["kernel"], dense["bias"], dense["kernel"]]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    # Across seeds the bound itself is approached: 50 draws of 15 values reach 0.49.
    values = np.concatenate([np.concatenate([p["dense"]["kernel"].ravel(), p["dense"]["bias"]])
                             for p in (init_params(TinyHead(), s, *shapes) for s in range(50))])  # fmt: skip
    assert 0.49 < np.abs(values).max() <= 0.5

    flax = init_params(TinyHead(), 5, *shapes, init="flax")
    np.testing.assert_array_equal(flax["dense"]["bias"], np.zeros(3, np.float32))
    np.testing.assert_array_equal(flax["conv"]["bias"], np.zeros(2, np.float32))
    assert np.abs(flax["dense"]["kernel"]).max() <= 2 * 0.5 / 0.87962566103423978  # truncated 2σ


def _fingerprint(params: dict) -> tuple[str, float]:
    """SHA-256 of every param but the orthogonal recurrent kernels (bit-exact numpy draws), and
    a weighted sum of those (they go through LAPACK's QR, exact only to rounding)."""
    digest, recurrent = hashlib.sha256(), 0.0
    for path, value in sorted(flatten_dict(params).items()):
        value = np.ascontiguousarray(value, np.float32)
        if path[-2] in ("hr", "hz", "hn") and path[-1] == "kernel":
            weights = np.arange(1, value.size + 1, dtype=np.float64).reshape(value.shape)
            recurrent += float(np.sum(value * weights))
        else:
            digest.update("/".join(path).encode())
            digest.update(value.tobytes())
    return digest.hexdigest(), recurrent


# Computed with `init_params` as it was before the "pytorch" default existed (Flax's
# distributions only), seed 7, text_dim 12, tokens (1, 9, 9, 16) × 4.
PREVIOUS = [
    (dict(hidden_dim=8),
     "98574d57e65b94d42608d46e091fe85d9ffb626ac7848746c1e0799d271ce5d9", 111.03510942799039),
    (dict(hidden_dim=8, shared_projection=False, gru_reading="sequence"),
     "57f03b81deb1abefc0ce2fed3962f8ee0fc1651b7f6356afb775db5c8b91b06a", -875.7458403274068),
    (dict(kind="aprilgan"),
     "d036d62e754eb78b05a88d9bc9321982184db20445e25acd27f0876b9fa9a2ae", 0.0),
]  # fmt: skip


@pytest.mark.parametrize(("change", "digest", "recurrent"), PREVIOUS)
def test_flax_init_reproduces_previous_params(change, digest, recurrent):
    config = HeadConfig(init="flax", **change)
    params = init_params(build_head(config, 12), 7, [(1, 9, 9, 16)] * 4, (1, 2, 12), config.init)
    got_digest, got_recurrent = _fingerprint(params)
    assert got_digest == digest
    assert got_recurrent == pytest.approx(recurrent, abs=1e-3)


def test_default_is_pytorch_and_unknown_init_is_refused():
    assert HeadConfig().init == "pytorch"
    head = build_head(HeadConfig(kind="aprilgan"), 12)
    shapes = ([(1, 9, 9, 16)] * 4, (1, 2, 12))
    default = flatten_dict(init_params(head, 0, *shapes))
    assert all(np.any(v != 0) for p, v in default.items() if p[-1] == "bias")  # torch's biases
    explicit = flatten_dict(init_params(head, 0, *shapes, init="pytorch"))
    assert all(np.array_equal(default[p], explicit[p]) for p in default)
    with pytest.raises(ValueError, match="unknown head init 'torch'"):
        init_params(head, 0, *shapes, init="torch")
