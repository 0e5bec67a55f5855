"""The GGUF header reader: the fast reader sees exactly what the gguf package sees."""

from __future__ import annotations

from pathlib import Path

import gguf

from edgerunner.pack.gguf_info import ModelInfo, _HeaderReader, read_model_info


def test_fast_reader_matches_gguf_package(default_model: Path) -> None:
    slow, fast = gguf.GGUFReader(default_model, "r"), _HeaderReader(default_model, "r")
    assert list(slow.fields) == list(fast.fields)
    for key in ("general.architecture", "llama.block_count", "tokenizer.chat_template"):
        assert slow.fields[key].contents() == fast.fields[key].contents()
    tokens = "tokenizer.ggml.tokens"
    assert slow.fields[tokens].contents()[-5:] == fast.fields[tokens].contents()[-5:]
    assert [(t.name, t.tensor_type, int(t.data_offset)) for t in slow.tensors] == [
        (t.name, t.tensor_type, int(t.data_offset)) for t in fast.tensors
    ]


def test_model_info_of_default_model(default_model: Path) -> None:
    info = read_model_info(default_model)
    assert (info.architecture, info.n_layer, info.n_embd, info.n_head) == ("llama", 30, 576, 9)
    assert info.n_head_kv == [3] * 30  # GQA: 9 query heads share 3 KV heads
    assert (info.key_length, info.value_length, info.n_vocab) == (64, 64, 49152)
    assert info.n_ctx_train == 8192 and info.file_type == "Q4_1"
    assert info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert not info.has_swa
    assert sum(t.n_bytes for t in info.tensors) < info.file_size


def test_swa_pattern_from_architecture_period() -> None:
    from edgerunner.pack.gguf_info import _swa_layers

    gemma3 = _swa_layers("gemma3", 12, 1024, None)
    assert gemma3 == [True] * 5 + [False] + [True] * 5 + [False]
    assert _swa_layers("llama", 4, 0, None) == [False] * 4
    assert _swa_layers("gemma3n", 3, 512, [True, False, True]) == [True, False, True]


def test_a_window_llama_cpp_ignores_is_no_window(tmp_path: Path) -> None:
    """Phi-3's converter writes config.json's sliding_window; llama.cpp's phi3 switches it off
    and gives every layer a full cache. gemma3's window is kept (5 of every 6 layers)."""
    from edgerunner.pack.memory import kv_bytes, reserved_compute_bytes
    from tests.shapes import Shape, spm_tokenizer, write_f16_source

    def info_of(arch: str, window: int) -> ModelInfo:
        shape = Shape(name=f"tiny {arch}", arch=arch, size_label="1M", n_layer=6, n_embd=64,
                      n_ff=128, n_head=4, n_head_kv=4, n_vocab=300, n_ctx_train=4096,
                      rope_theta=1e4, rms_eps=1e-5, sliding_window=window, vocab="spm",
                      fused=arch == "phi3", tied=arch != "phi3")
        path = tmp_path / f"{arch}.gguf"
        write_f16_source(shape, spm_tokenizer(300), path)
        return read_model_info(path)

    phi3 = info_of("phi3", 2047)  # Phi-3-mini-4k's window
    assert (phi3.sliding_window, phi3.has_swa, phi3.fused_qkv) == (0, False, True)
    assert kv_bytes(phi3, 4096, swa_full=False) == kv_bytes(phi3, 4096)
    unwindowed = phi3.model_copy(update={"sliding_window": 0})
    assert reserved_compute_bytes(phi3, 4096) == reserved_compute_bytes(unwindowed, 4096)
    gemma3 = info_of("gemma3", 512)
    assert gemma3.sliding_window == 512 and gemma3.swa_layers == [True] * 5 + [False]
    assert kv_bytes(gemma3, 4096, swa_full=False) < kv_bytes(gemma3, 4096)


def test_f32_source_is_a_float_source(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "tiny-f32.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_vocab_size(16)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_model_info(path)
    assert info.file_type == "F32"
    assert info.n_head_kv == [2] and info.n_vocab == 16
