"""Generation-free weight comparison of two LoRA files."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from lora_writers import write_kohya, write_peft
from safetensors.numpy import load_file, save_file

from carlos_audit.cli import main
from carlos_audit.errors import AuditError
from carlos_audit.lora.modules import delta_inner
from carlos_audit.lora.weights import compare_weights, weights_reading

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
MODULES = {
    f"{ATTN}.attn1.to_q": (64, 64),
    f"{ATTN}.attn2.to_k": (32, 64),  # cross-attention dim 32
    f"{ATTN}.attn1.to_out.0": (64, 64),
}
CONV = "down_blocks.1.resnets.0.conv1"  # conv 3x3, 32 -> 64


def make_factors(seed=0, rank=4, conv=False):
    rng = np.random.default_rng(seed)
    factors = {
        name: (rng.standard_normal((rank, n_in)).astype(np.float32), rng.standard_normal((n_out, rank)).astype(np.float32))
        for name, (n_in, n_out) in MODULES.items()
    }
    if conv:
        factors[CONV] = (
            rng.standard_normal((rank, 32, 3, 3)).astype(np.float32),
            rng.standard_normal((64, rank, 1, 1)).astype(np.float32),
        )
    return factors


@pytest.fixture
def lora_a(tmp_path):
    return write_kohya(tmp_path / "a.safetensors", make_factors(conv=True), alpha=2.0, metadata={"ss_output_name": "a"})


def test_reupload_with_rewritten_metadata(tmp_path, lora_a):
    b = write_kohya(tmp_path / "b.safetensors", make_factors(conv=True), alpha=2.0, metadata={"ss_output_name": "stolen"})
    result = compare_weights(lora_a, b)
    assert result["payload_identical"] is True
    assert result["sha256_a"] != result["sha256_b"]
    assert result["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert result["modules_compared"] == 4
    assert weights_reading(result).startswith("re-upload")


def test_rescaled_up_factors(tmp_path, lora_a):
    factors = {n: (d, u * 0.5) for n, (d, u) in make_factors(conv=True).items()}
    b = write_kohya(tmp_path / "b.safetensors", factors, alpha=2.0)
    result = compare_weights(lora_a, b)
    assert result["payload_identical"] is False
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["norm_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert weights_reading(result) == "rescaled copy"


def test_same_weights_other_format(tmp_path):
    factors = make_factors(conv=True)
    peft = write_peft(tmp_path / "p.safetensors", factors)  # no alpha: alpha = rank
    for kohya in (
        write_kohya(tmp_path / "k.safetensors", factors),
        write_kohya(tmp_path / "k_alpha.safetensors", factors, alpha=4.0),
    ):
        result = compare_weights(kohya, peft)
        assert (result["format_a"], result["format_b"]) == ("kohya", "diffusers_peft")
        assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    # without alpha tensors the two files even hold the same payload bytes (same tensor order)
    assert compare_weights(tmp_path / "k.safetensors", peft)["payload_identical"] is True
    assert result["payload_identical"] is False
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert result["modules_only_in_a"] == result["modules_only_in_b"] == []
    assert all(m["cosine"] == pytest.approx(1.0, abs=1e-6) for m in result["per_module"])
    assert weights_reading(result) == "same weights (possibly different format)"


def test_kohya_alpha_matches_peft_metadata_alpha(tmp_path):
    factors = make_factors()
    kohya = write_kohya(tmp_path / "k.safetensors", factors, alpha=2.0)
    peft = write_peft(tmp_path / "p.safetensors", factors, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})})
    result = compare_weights(kohya, peft)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_alpha_doubled(tmp_path, lora_a):
    b = write_kohya(tmp_path / "b.safetensors", make_factors(conv=True), alpha=4.0)
    result = compare_weights(lora_a, b)
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["norm_ratio"] == pytest.approx(2.0, abs=1e-6)


def test_unrelated_lora(tmp_path, lora_a):
    b = write_kohya(tmp_path / "b.safetensors", make_factors(seed=1, conv=True), alpha=2.0)
    result = compare_weights(lora_a, b)
    assert abs(result["cosine"]) < 0.5
    assert weights_reading(result).startswith("low similarity")


def test_partial_similarity_reading(tmp_path):
    base, other = make_factors(seed=0), make_factors(seed=1)
    mixed = {n: (np.concatenate([base[n][0], other[n][0]]), np.concatenate([base[n][1], 0.5 * other[n][1]], axis=1)) for n in base}
    result = compare_weights(write_peft(tmp_path / "a.safetensors", base), write_peft(tmp_path / "m.safetensors", mixed))
    assert 0.5 <= result["cosine"] < 0.999
    assert weights_reading(result).startswith("high but partial similarity")


def test_differing_ranks(tmp_path):
    rng = np.random.default_rng(0)
    name = f"{ATTN}.attn1.to_q"
    down4, up4 = rng.standard_normal((4, 64)), rng.standard_normal((64, 4))
    # the same dW written at rank 8: zero-padded factors
    down8 = np.concatenate([down4, rng.standard_normal((4, 64))]).astype(np.float32)
    up8 = np.concatenate([up4, np.zeros((64, 4))], axis=1).astype(np.float32)
    a = write_peft(tmp_path / "a.safetensors", {name: (down4.astype(np.float32), up4.astype(np.float32))})
    b = write_peft(tmp_path / "b.safetensors", {name: (down8, up8)})
    result = compare_weights(a, b)
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_low_rank_identity_equals_dense():
    rng = np.random.default_rng(0)
    u1, d1 = rng.standard_normal((7, 3)), rng.standard_normal((3, 5))
    u2, d2 = rng.standard_normal((7, 2)), rng.standard_normal((2, 5))
    a = {"up": u1, "down": d1, "scale": 0.5}
    b = {"up": u2, "down": d2, "scale": 2.0}
    dense_a, dense_b = 0.5 * u1 @ d1, 2.0 * u2 @ d2
    expected = float(np.sum(dense_a * dense_b))
    assert delta_inner(a, b) == pytest.approx(expected, rel=1e-12)
    assert delta_inner(a, {"dense": dense_b}) == pytest.approx(expected, rel=1e-12)
    assert delta_inner({"dense": dense_a}, b) == pytest.approx(expected, rel=1e-12)
    assert delta_inner(a, a) == pytest.approx(np.linalg.norm(dense_a) ** 2, rel=1e-12)


def test_conv_module_against_dense(tmp_path):
    factors_a, factors_b = make_factors(seed=0, conv=True), make_factors(seed=3, conv=True)
    result = compare_weights(write_peft(tmp_path / "a.safetensors", factors_a), write_peft(tmp_path / "b.safetensors", factors_b))
    row = next(m for m in result["per_module"] if m["name"] == f"unet.{CONV}")
    dense = [f[CONV][1].astype(np.float64).reshape(64, -1) @ f[CONV][0].astype(np.float64).reshape(4, -1) for f in (factors_a, factors_b)]
    expected = np.sum(dense[0] * dense[1]) / (np.linalg.norm(dense[0]) * np.linalg.norm(dense[1]))
    assert row["cosine"] == pytest.approx(expected, abs=1e-9)
    assert row["norm_a"] == pytest.approx(np.linalg.norm(dense[0]), rel=1e-9)


def write_full_rank_peft(path, name, dense, kernel=None):
    """A peft LoRA whose (full-rank) factors reproduce ``dense`` (out, in*kh*kw) exactly."""
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    r = len(s)
    up, down = (u * s).astype(np.float32), vt.astype(np.float32)
    if kernel is not None:
        up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape(r, -1, *kernel)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": r, "unet.lora_alpha": r})}
    return write_peft(path, {name: (down, up)}, metadata=metadata)


def _kohya_key(name):
    return "lora_unet_" + name.replace(".", "_")


def test_lycoris_loha_compares_with_dense_lora(tmp_path):
    rng = np.random.default_rng(0)
    name = f"{ATTN}.attn1.to_q"
    w1a, w1b, w2a, w2b = (rng.standard_normal(s).astype(np.float32) for s in ((64, 2), (2, 64), (64, 2), (2, 64)))
    key = _kohya_key(name)
    save_file({f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a, f"{key}.hada_w2_b": w2b, f"{key}.alpha": np.array(1.0, dtype=np.float32)}, str(tmp_path / "loha.safetensors"))
    dense = 0.5 * (w1a.astype(np.float64) @ w1b) * (w2a.astype(np.float64) @ w2b)  # scale alpha/rank = 1/2
    write_full_rank_peft(tmp_path / "full_rank.safetensors", name, dense)
    result = compare_weights(tmp_path / "loha.safetensors", tmp_path / "full_rank.safetensors")
    assert result["format_a"] == "lycoris_loha"
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_lycoris_lokr_compares_with_dense_lora(tmp_path):
    rng = np.random.default_rng(0)
    name = f"{ATTN}.attn1.to_q"
    w1 = rng.standard_normal((4, 4)).astype(np.float32)
    w2a, w2b = rng.standard_normal((16, 2)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    key = _kohya_key(name)
    save_file({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b, f"{key}.alpha": np.array(4.0, dtype=np.float32)}, str(tmp_path / "lokr.safetensors"))
    dense = 2.0 * np.kron(w1.astype(np.float64), w2a.astype(np.float64) @ w2b)  # scale alpha/rank = 4/2
    write_full_rank_peft(tmp_path / "full_rank.safetensors", name, dense)
    result = compare_weights(tmp_path / "lokr.safetensors", tmp_path / "full_rank.safetensors")
    assert result["format_a"] == "lycoris_lokr"
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_locon_tucker_mid_compares_with_dense_conv(tmp_path):
    rng = np.random.default_rng(0)
    down = rng.standard_normal((4, 32, 1, 1)).astype(np.float32)
    mid = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    up = rng.standard_normal((64, 4, 1, 1)).astype(np.float32)
    key = _kohya_key(CONV)
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up}, str(tmp_path / "tucker.safetensors"))
    # y = up(mid(down(x))): W[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]
    dense = np.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0].astype(np.float64), mid, down[:, :, 0, 0]).reshape(64, -1)
    write_full_rank_peft(tmp_path / "full_rank.safetensors", CONV, dense, kernel=(3, 3))
    result = compare_weights(tmp_path / "tucker.safetensors", tmp_path / "full_rank.safetensors")
    assert result["format_a"] == "lycoris_locon_mid"
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_dora_modules_are_skipped_with_reason(tmp_path, lora_a):
    factors = make_factors(conv=True)
    b = write_kohya(tmp_path / "dora.safetensors", factors, alpha=2.0)
    tensors = load_file(str(b))
    tensors[_kohya_key(f"{ATTN}.attn1.to_q") + ".dora_scale"] = np.ones((64, 1), dtype=np.float32)
    save_file(tensors, str(b))
    result = compare_weights(lora_a, b)
    assert result["modules_compared"] == 3
    assert result["modules_skipped"][0]["name"] == f"unet.{ATTN}.attn1.to_q"
    assert "DoRA" in result["modules_skipped"][0]["reason"]


def test_modules_only_in_one_file(tmp_path):
    factors = make_factors()
    fewer = {n: f for n, f in factors.items() if not n.endswith("to_out.0")}
    result = compare_weights(write_peft(tmp_path / "a.safetensors", factors), write_peft(tmp_path / "b.safetensors", fewer))
    assert result["modules_compared"] == 2
    assert result["modules_only_in_a"] == [f"unet.{ATTN}.attn1.to_out.0"]
    assert result["modules_only_in_b"] == []


def test_shape_mismatch_is_skipped_not_compared(tmp_path):
    name = f"{ATTN}.attn1.to_q"
    rng = np.random.default_rng(0)
    a = write_peft(tmp_path / "a.safetensors", {name: (rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32))})
    b = write_peft(tmp_path / "b.safetensors", {name: (rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32))})
    result = compare_weights(a, b)
    assert result["modules_compared"] == 0 and result["cosine"] is None
    assert "shape mismatch" in result["modules_skipped"][0]["reason"]
    assert weights_reading(result).startswith("no comparable modules")


def test_refusals(tmp_path, lora_a):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"\x80\x04\x95")
    with pytest.raises(AuditError, match="pickle"):
        compare_weights(lora_a, ckpt)
    empty = tmp_path / "none.safetensors"
    save_file({"something_else": np.zeros(2, dtype=np.float32)}, str(empty))
    with pytest.raises(AuditError, match="no LoRA modules"):
        compare_weights(lora_a, empty)


def test_cli_compare_weights(tmp_path, lora_a):
    b = write_peft(tmp_path / "p.safetensors", make_factors(conv=True), metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})})
    result = CliRunner().invoke(main, ["compare-weights", str(lora_a), str(b)])
    assert result.exit_code == 0, result.output
    assert "same weights (possibly different format)" in result.output

    result = CliRunner().invoke(main, ["compare-weights", str(lora_a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cosine"] == pytest.approx(1.0, abs=1e-6) and "reading" in data


def test_cli_compare_weights_bad_input(tmp_path, lora_a):
    result = CliRunner().invoke(main, ["compare-weights", str(lora_a), str(tmp_path / "missing.safetensors")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("Error:") and "not found" in result.output
