"""LoRA intake: refusals, hashes, format/architecture detection, names, metadata, CLI."""

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_writers import write_kohya, write_peft
from safetensors.numpy import save_file

from carlos_audit.cli import main
from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import check_not_pickle, validate_safetensors
from carlos_audit.lora.inspection import (
    claimed_base_model_hash,
    compare_base_hash,
    detect_architecture,
    inspect_lora,
    trigger_word_hints,
)
from carlos_audit.lora.keys import kohya_to_diffusers_name
from carlos_audit.lora.modules import TensorReader, detect_format, read_modules

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
# module -> (in_features, out_features); attn2.to_k reads the text encoder (cross-attention dim 32)
MODULES = {
    f"{ATTN}.attn1.to_q": (64, 64),
    f"{ATTN}.attn2.to_k": (32, 64),
    f"{ATTN}.attn1.to_out.0": (64, 64),
}
RANK = 4


def make_factors(seed=0, modules=MODULES, rank=RANK):
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal((rank, n_in)).astype(np.float32), rng.standard_normal((n_out, rank)).astype(np.float32))
        for name, (n_in, n_out) in modules.items()
    }


def write_raw(path, header, payload=b"", declared_length=None):
    """A safetensors-shaped file from a header (dict or bytes) and payload, unchecked."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_length is None else declared_length
    Path(path).write_bytes(struct.pack("<Q", n) + raw + payload)
    return path


def f32_entry(shape, begin):
    end = begin + 4 * int(np.prod(shape))
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


# ------------------------------------------------------------------------------- refusals


def test_missing_file(tmp_path):
    with pytest.raises(AuditError, match="not found"):
        validate_safetensors(tmp_path / "nope.safetensors")


def test_directory(tmp_path):
    with pytest.raises(AuditError, match="is a directory"):
        validate_safetensors(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(AuditError, match="empty"):
        validate_safetensors(p)


def test_four_byte_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(AuditError, match="too short"):
        validate_safetensors(p)


def test_header_length_beyond_file(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {}, declared_length=1000)
    with pytest.raises(AuditError, match="exceeds the file size"):
        validate_safetensors(p)


def test_absurd_header_length(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {}, declared_length=2**60)
    with pytest.raises(AuditError, match="absurd"):
        validate_safetensors(p)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}', "duplicate key"),
    ],
)
def test_bad_header(tmp_path, raw, message):
    p = write_raw(tmp_path / "x.safetensors", raw, payload=b"\0" * 4)
    with pytest.raises(AuditError, match=message):
        validate_safetensors(p)


@pytest.mark.parametrize(
    "entry, payload_len, message",
    [
        ({"shape": [1], "data_offsets": [0, 4]}, 4, "missing 'dtype'"),
        ({"dtype": "F32", "data_offsets": [0, 4]}, 4, "missing 'shape'"),
        ({"dtype": "F32", "shape": [1]}, 4, "missing 'data_offsets'"),
        ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, 4, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, 4, "non-negative"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}, 4, "outside the payload"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, 4, "before begin"),
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 4]}, 4, "need 24"),
    ],
)
def test_bad_tensor_entry(tmp_path, entry, payload_len, message):
    p = write_raw(tmp_path / "x.safetensors", {"t": entry}, payload=b"\0" * payload_len)
    with pytest.raises(AuditError, match=message):
        validate_safetensors(p)


def test_overlapping_tensors(tmp_path):
    header = {"a": f32_entry([4], 0), "b": f32_entry([4], 8)}
    p = write_raw(tmp_path / "x.safetensors", header, payload=b"\0" * 24)
    with pytest.raises(AuditError, match="overlap"):
        validate_safetensors(p)


def test_gap_between_tensors(tmp_path):
    header = {"a": f32_entry([1], 0), "b": f32_entry([1], 8)}
    p = write_raw(tmp_path / "x.safetensors", header, payload=b"\0" * 12)
    with pytest.raises(AuditError, match="not covered"):
        validate_safetensors(p)


def test_trailing_garbage(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=4.0)
    validate_safetensors(p)
    with open(p, "ab") as f:
        f.write(b"garbage")
    with pytest.raises(AuditError, match="trailing payload bytes"):
        validate_safetensors(p)


def test_metadata_must_be_strings(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {"__metadata__": {"a": 1}})
    with pytest.raises(AuditError, match="not a string"):
        validate_safetensors(p)


def test_error_message_is_one_line_and_names_file(tmp_path):
    p = write_raw(tmp_path / "named.safetensors", b"{oops")
    with pytest.raises(AuditError) as info:
        validate_safetensors(p)
    assert "named.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_valid_file_header_returned(tmp_path):
    p = write_peft(tmp_path / "a.safetensors", make_factors(), metadata={"k": "v"})
    header = validate_safetensors(p)
    assert header["__metadata__"] == {"k": "v"}
    assert header[f"unet.{ATTN}.attn1.to_q.lora_A.weight"]["shape"] == [RANK, 64]


# ------------------------------------------------------------------------------- pickle


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".bin", ".pth", ".pkl"])
def test_pickle_extension_refused(tmp_path, ext):
    p = tmp_path / f"model{ext}"
    p.write_bytes(b"\x80\x04\x95whatever")
    with pytest.raises(AuditError, match="allow-unsafe-pickle"):
        check_not_pickle(p)
    assert check_not_pickle(p, allow_unsafe_pickle=True) is True


@pytest.mark.parametrize("magic", [b"\x80\x02\x8a\x0alm\xfc\x9cF\xf9 j", b"PK\x03\x04\x14\x00\x00\x00\x08\x00"])
def test_pickle_or_zip_magic_refused_despite_name(tmp_path, magic):
    p = tmp_path / "innocent.safetensors"
    p.write_bytes(magic + b"\0" * 100)
    with pytest.raises(AuditError, match="pickle files can execute code"):
        check_not_pickle(p)


def test_safetensors_whose_length_looks_like_pickle_magic_is_accepted(tmp_path):
    # a 640-byte header is 0x0280: the file starts 80 02, like pickle protocol 2
    raw = json.dumps({"t": f32_entry([1], 0)}).encode()
    raw += b" " * (640 - len(raw))
    p = write_raw(tmp_path / "x.safetensors", raw, payload=b"\0" * 4)
    assert p.read_bytes()[:2] == b"\x80\x02"
    assert check_not_pickle(p) is False
    validate_safetensors(p)


def test_safetensors_is_not_pickle(tmp_path):
    assert check_not_pickle(write_peft(tmp_path / "a.safetensors", make_factors())) is False


def test_inspect_allowed_pickle_is_hashed_not_opened(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04\x95 not really a pickle")
    with pytest.raises(AuditError, match="pickle"):
        inspect_lora(p)
    report = inspect_lora(p, allow_unsafe_pickle=True)
    assert report["format"] == "pickle" and report["modules"] == []
    assert report["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- hashes


def test_hashes(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=2.0, metadata={"ss_output_name": "a"})
    report = inspect_lora(p)
    data = p.read_bytes()
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    assert report["autov2"] == report["sha256"][:10]
    n = struct.unpack("<Q", data[:8])[0]
    assert report["payload_sha256"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert report["size"] == len(data)

    q = write_kohya(tmp_path / "k2.safetensors", make_factors(), alpha=2.0, metadata={"ss_output_name": "renamed!"})
    other = inspect_lora(q)
    assert other["sha256"] != report["sha256"]
    assert other["payload_sha256"] == report["payload_sha256"]


def test_input_files_unchanged(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=2.0, metadata={"ss_new_sd_model_hash": "ab" * 32})
    before = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    inspect_lora(p, base_model_sha256="cd" * 32)
    read_modules(p)
    assert (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) == before


# ------------------------------------------------------------------------------- formats


def _header(tensors: dict) -> dict:
    """A header (shapes only) for detection tests."""
    return {k: {"dtype": "F32", "shape": list(s), "data_offsets": [0, 0]} for k, s in tensors.items()}


def test_format_diffusers_peft(tmp_path):
    p = write_peft(tmp_path / "a.safetensors", make_factors())
    assert detect_format(validate_safetensors(p)) == "diffusers_peft"
    assert inspect_lora(p)["format"] == "diffusers_peft"


def test_format_kohya(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=4.0)
    assert inspect_lora(p)["format"] == "kohya"


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({f"unet.{ATTN}.attn1.processor.to_q_lora.down.weight": (4, 64), f"unet.{ATTN}.attn1.processor.to_q_lora.up.weight": (64, 4)}, "diffusers_legacy"),
        ({f"unet.{ATTN}.attn1.to_q.lora.down.weight": (4, 64), f"unet.{ATTN}.attn1.to_q.lora.up.weight": (64, 4)}, "diffusers_legacy"),
        ({f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 32)}, "diffusers_peft"),
        ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 32)}, "kohya"),
        ({"lora_unet_x_attn1_to_q.hada_w1_a": (64, 4), "lora_unet_x_attn1_to_q.hada_w1_b": (4, 64)}, "lycoris_loha"),
        ({"lora_unet_x_attn1_to_q.lokr_w1": (8, 8), "lora_unet_x_attn1_to_q.lokr_w2": (8, 8)}, "lycoris_lokr"),
        ({"lora_unet_x_conv1.lora_down.weight": (4, 32, 1, 1), "lora_unet_x_conv1.lora_mid.weight": (4, 4, 3, 3), "lora_unet_x_conv1.lora_up.weight": (64, 4, 1, 1)}, "lycoris_locon_mid"),
        ({"model.diffusion_model.something.weight": (4, 4)}, "unknown"),
    ],
)
def test_format_detection(keys, expected):
    assert detect_format(_header(keys)) == expected


def test_legacy_processor_names_map_to_modules():
    from carlos_audit.lora.keys import parse_key

    assert parse_key(f"unet.{ATTN}.attn1.processor.to_out_lora.up.weight") == ("legacy", f"unet.{ATTN}.attn1.to_out.0", "up")
    assert parse_key(f"{ATTN}.attn2.processor.to_k_lora.down.weight") == ("legacy", f"unet.{ATTN}.attn2.to_k", "down")


# ------------------------------------------------------------------------------- architecture


def _modules(shapes: dict) -> dict:
    """Fake read_modules output: canonical name -> in_features."""
    return {name: {"in_features": n_in} for name, n_in in shapes.items()}


def test_architecture_from_cross_attention_dim():
    assert detect_architecture(_modules({f"unet.{ATTN}.attn2.to_k": 768}))[0] == "sd15"
    arch, evidence = detect_architecture(_modules({f"unet.{ATTN}.attn2.to_v": 2048, f"unet.{ATTN}.attn1.to_q": 640}))
    assert arch == "sdxl" and evidence["cross_attention_dims"] == [2048]
    assert detect_architecture(_modules({f"unet.{ATTN}.attn2.to_k": 32}))[0] == "other"
    assert detect_architecture(_modules({f"unet.{ATTN}.attn2.to_k": 768, "unet.x.attn2.to_k": 2048}))[0] == "other"


def test_architecture_structural_rules():
    te2 = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": 1280}
    assert detect_architecture(_modules(te2))[0] == "sdxl"
    sd15 = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 320}
    assert detect_architecture(_modules(sd15))[0] == "sd15"
    xl = {"unet.down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q": 1280}
    assert detect_architecture(_modules(xl))[0] == "sdxl"
    arch, evidence = detect_architecture(_modules({"unet.down_blocks.1.resnets.0.conv1": 320}))
    assert arch == "other" and evidence["rule"] == "no distinguishing modules"


def test_architecture_of_files(tmp_path):
    tiny = inspect_lora(write_peft(tmp_path / "tiny.safetensors", make_factors()))
    assert tiny["architecture"] == "other"
    assert tiny["architecture_evidence"]["cross_attention_dims"] == [32]

    # kohya SDXL: original-UNet names, cross-attention dim 2048
    xl = {
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k": (2048, 640),
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q": (640, 640),
    }
    factors = make_factors(modules=xl)
    tensors = {}
    for name, (down, up) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    report = inspect_lora(tmp_path / "xl.safetensors")
    assert report["architecture"] == "sdxl"
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in [m["name"] for m in report["modules"]]


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "kohya, diffusers",
    [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_down_blocks_0_resnets_1_time_emb_proj", "unet.down_blocks.0.resnets.1.time_emb_proj"),
        ("lora_unet_up_blocks_0_resnets_0_conv_shortcut", "unet.up_blocks.0.resnets.0.conv_shortcut"),
        ("lora_unet_down_blocks_2_attentions_1_proj_in", "unet.down_blocks.2.attentions.1.proj_in"),
        ("lora_unet_down_blocks_1_downsamplers_0_conv", "unet.down_blocks.1.downsamplers.0.conv"),
        ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
        ("lora_te2_text_model_encoder_layers_31_self_attn_k_proj", "text_encoder_2.text_model.encoder.layers.31.self_attn.k_proj"),
        # kohya SDXL writes original-UNet (LDM) names
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("lora_unet_input_blocks_8_1_proj_out", "unet.down_blocks.2.attentions.1.proj_out"),
        ("lora_unet_input_blocks_2_0_in_layers_2", "unet.down_blocks.0.resnets.1.conv1"),
        ("lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv"),
        ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v", "unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_v"),
        ("lora_unet_middle_block_2_emb_layers_1", "unet.mid_block.resnets.1.time_emb_proj"),
        ("lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv"),
        ("lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2", "unet.up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2"),
        ("lora_unet_output_blocks_6_0_skip_connection", "unet.up_blocks.2.resnets.0.conv_shortcut"),
        ("lora_unet_time_embed_0", "unet.time_embedding.linear_1"),
        ("lora_unet_label_emb_0_2", "unet.add_embedding.linear_2"),
    ],
)
def test_kohya_to_diffusers_best_effort(kohya, diffusers):
    assert kohya_to_diffusers_name(kohya) == diffusers


def test_kohya_to_diffusers_with_known_names():
    known = ["down_blocks.0.my_odd_layer.to_q", "mid_block.attentions.0.proj_in"]
    assert kohya_to_diffusers_name("lora_unet_down_blocks_0_my_odd_layer_to_q", known) == "unet.down_blocks.0.my_odd_layer.to_q"
    # best effort would split "my_odd_layer"
    assert kohya_to_diffusers_name("lora_unet_down_blocks_0_my_odd_layer_to_q") == "unet.down_blocks.0.my.odd.layer.to_q"
    # known names given with the component prefix work as well
    assert kohya_to_diffusers_name("lora_unet_mid_block_attentions_0_proj_in", ["unet.mid_block.attentions.0.proj_in"]) == "unet.mid_block.attentions.0.proj_in"
    with pytest.raises(AuditError, match="matches no module"):
        kohya_to_diffusers_name("lora_unet_not_a_module", known)


def test_kohya_and_peft_files_give_same_modules(tmp_path):
    factors = make_factors()
    a = read_modules(write_peft(tmp_path / "a.safetensors", factors))
    b = read_modules(write_kohya(tmp_path / "b.safetensors", factors, alpha=4.0))
    assert sorted(a) == sorted(b) == sorted(f"unet.{n}" for n in MODULES)


# ------------------------------------------------------------------------------- modules


def test_module_summary(tmp_path):
    factors = make_factors()
    report = inspect_lora(write_kohya(tmp_path / "k.safetensors", factors, alpha=2.0))
    assert report["module_count"] == 3
    row = next(m for m in report["modules"] if m["name"].endswith("attn2.to_k"))
    down, up = factors[f"{ATTN}.attn2.to_k"]
    assert (row["rank"], row["alpha"], row["scale"], row["in_features"], row["out_features"]) == (4, 2.0, 0.5, 32, 64)
    assert row["parameter_count"] == down.size + up.size
    assert row["down_norm"] == pytest.approx(np.linalg.norm(down.astype(np.float64)))
    assert row["up_norm"] == pytest.approx(np.linalg.norm(up.astype(np.float64)))
    dense = 0.5 * up.astype(np.float64) @ down.astype(np.float64)
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(dense))
    assert report["parameter_count"] == sum(d.size + u.size for d, u in factors.values())
    assert report["rank_summary"]["distinct"] == [4]
    assert report["alpha_summary"]["distinct"] == [2.0]
    json.dumps(report, allow_nan=False)  # JSON-serialisable


def test_peft_alpha_from_diffusers_metadata(tmp_path):
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}}
    p = write_peft(tmp_path / "a.safetensors", make_factors(), metadata={"lora_adapter_metadata": json.dumps(config)})
    modules = read_modules(p)
    assert modules[f"unet.{ATTN}.attn1.to_q"]["scale"] == 2.0
    assert modules[f"unet.{ATTN}.attn2.to_k"]["alpha"] == 2.0
    assert modules[f"unet.{ATTN}.attn2.to_k"]["alpha_source"] == "peft_metadata"
    plain = read_modules(write_peft(tmp_path / "b.safetensors", make_factors()))
    assert plain[f"unet.{ATTN}.attn1.to_q"]["alpha"] is None
    assert plain[f"unet.{ATTN}.attn1.to_q"]["scale"] == 1.0


def test_bf16_tensors_are_read_without_torch(tmp_path):
    values = np.array([1.5, -2.0, 0.15625, 3.0e10], dtype=np.float32)
    payload = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = {"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(payload)]}}
    p = write_raw(tmp_path / "bf16.safetensors", header, payload)
    with TensorReader(p) as reader:
        got = reader.get("t")
    expected = ((values.view(np.uint32) >> 16) << 16).view(np.float32).reshape(2, 2)
    np.testing.assert_array_equal(got, expected)


def test_intake_does_not_import_torch(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=4.0)
    code = (
        "import sys; from carlos_audit.lora.inspection import inspect_lora; "
        f"inspect_lora({str(p)!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ------------------------------------------------------------------------------- metadata


def test_base_hash_claims(tmp_path):
    base = "ab" * 32
    assert compare_base_hash(None, base) == "absent"
    assert compare_base_hash(base.upper(), base) == "match"
    assert compare_base_hash("0x" + base, base) == "match"
    assert compare_base_hash(base[:10], base) == "match"
    assert compare_base_hash("cd" * 32, base) == "mismatch"

    assert claimed_base_model_hash({"ss_sd_model_hash": "1234abcd"}) == {"value": "1234abcd", "source": "ss_sd_model_hash", "legacy": True}

    p = write_kohya(tmp_path / "m.safetensors", make_factors(), alpha=4.0, metadata={"ss_new_sd_model_hash": base})
    assert inspect_lora(p, base_model_sha256=base)["base_model_hash_check"] == "match"
    assert inspect_lora(p, base_model_sha256="cd" * 32)["base_model_hash_check"] == "mismatch"
    assert inspect_lora(p)["base_model_hash_check"] == "not_checked"
    q = write_kohya(tmp_path / "n.safetensors", make_factors(), alpha=4.0)
    report = inspect_lora(q, base_model_sha256=base)
    assert report["base_model_hash_check"] == "absent" and report["claimed_base_model_hash"] is None
    r = write_kohya(tmp_path / "o.safetensors", make_factors(), alpha=4.0, metadata={"ss_sd_model_hash": "1234abcd"})
    assert inspect_lora(r, base_model_sha256=base)["base_model_hash_check"] == "not_comparable"


def test_trigger_word_hints():
    metadata = {
        "modelspec.trigger_phrase": "zxq style",
        "ss_tag_frequency": json.dumps({"10_zxq person": {"zxq": 20, "smile": 5, "outdoors": 7}, "5_other": {"smile": 4}}),
    }
    hints = trigger_word_hints(metadata, top=2)
    assert hints[0] == {"text": "zxq style", "source": "modelspec.trigger_phrase"}
    assert {"text": "zxq person", "source": "ss_tag_frequency dataset folder"} in hints
    tags = [h for h in hints if h["source"] == "ss_tag_frequency"]
    assert tags == [{"text": "zxq", "source": "ss_tag_frequency", "count": 20}, {"text": "smile", "source": "ss_tag_frequency", "count": 9}]
    assert trigger_word_hints({"ss_tag_frequency": "{broken"}) == []


def test_metadata_reported_verbatim(tmp_path):
    metadata = {"ss_output_name": "x", "sshs_model_hash": "abc", "modelspec.title": "T"}
    report = inspect_lora(write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=4.0, metadata=metadata))
    assert report["metadata"] == metadata


# ------------------------------------------------------------------------------- CLI


def test_cli_inspect(tmp_path):
    p = write_kohya(tmp_path / "k.safetensors", make_factors(), alpha=4.0, metadata={"ss_output_name": "demo"})
    result = CliRunner().invoke(main, ["inspect", str(p)])
    assert result.exit_code == 0, result.output
    assert "SELF-REPORTED metadata (unverified)" in result.output
    assert "kohya" in result.output and "ss_output_name" in result.output

    result = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["format"] == "kohya"


def test_cli_inspect_bad_input_is_one_line(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01\x02\x03\x04")
    result = CliRunner().invoke(main, ["inspect", str(p)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("Error:") and "too short" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_inspect_pickle_flag(tmp_path):
    p = tmp_path / "m.ckpt"
    p.write_bytes(b"\x80\x04\x95")
    assert CliRunner().invoke(main, ["inspect", str(p)]).exit_code != 0
    result = CliRunner().invoke(main, ["inspect", str(p), "--allow-unsafe-pickle", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["format"] == "pickle"
