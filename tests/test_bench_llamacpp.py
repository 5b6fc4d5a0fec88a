"""goose bench llamacpp, with stand-ins for llama.cpp's tools (the real build is a benchmark-time tool)."""
import json
import sys

import pytest

from goose.bench.llamacpp import llama_bench_rate, llama_cpp_tools, run
from goose.cli import main

FAKE_BENCH = f"""#!{sys.executable}
import json, sys
a = sys.argv
assert a[a.index("-m") + 1].endswith(".gguf") and a[a.index("-o") + 1] == "json"
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
print(json.dumps([{{"n_prompt": p, "n_gen": n, "avg_ts": 1000.0 if p else 50.0}}]))
"""
FAKE_CONVERTER = """import json, pathlib, sys
a = sys.argv
folder = pathlib.Path(a[1])
assert json.loads((folder / "config.json").read_text())["architectures"] == ["RWKV7ForCausalLM"]
assert (folder / "model.safetensors").is_file() and (folder / "rwkv_vocab_v20230424.txt").is_file()
pathlib.Path(a[a.index("--outfile") + 1]).write_text(a[a.index("--outtype") + 1])
"""


@pytest.fixture
def fake_llama_cpp(tmp_path):
    root = tmp_path / "llama.cpp"
    (root / "build" / "bin").mkdir(parents=True)
    bench = root / "build" / "bin" / "llama-bench"
    bench.write_text(FAKE_BENCH)
    bench.chmod(0o755)
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    return bench


def test_missing_llama_bench_says_how_to_build_it(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="scripts/build_llamacpp.sh"):
        llama_cpp_tools(tmp_path / "nowhere" / "llama-bench")
    with pytest.raises(SystemExit) as e:
        main(["bench", "llamacpp", "--llama-bench", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "scripts/build_llamacpp.sh" in capsys.readouterr().err


def test_llama_bench_output_is_parsed(fake_llama_cpp, tmp_path):
    gguf = tmp_path / "m.gguf"
    assert llama_bench_rate(fake_llama_cpp, gguf, 2, n_prompt=512) == 1000.0
    assert llama_bench_rate(fake_llama_cpp, gguf, 2, n_gen=128) == 50.0


def test_bench_exports_converts_and_prints_ratios(fake_llama_cpp, tmp_path, capsys):
    res = run(fake_llama_cpp, size="L1-D64", formats=("fp32", "int8"), repeats=1, n_prompt=16, n_gen=4,
              converter_python=sys.executable, cache_dir=tmp_path / "cache", out=str(tmp_path / "r.json"))
    printed = capsys.readouterr().out
    assert "goose fp32 / llama.cpp f32" in printed and "goose int8 / llama.cpp q8_0" in printed
    assert res["rates"]["llama.cpp q8_0 tg"] == 50.0 and res["rates"]["goose int8 pp"] > 0
    cache = tmp_path / "cache"
    assert (cache / "rwkv7-random-L1-D64-V65536-q8_0.gguf").read_text() == "q8_0"   # converted at q8_0
    assert json.loads((tmp_path / "r.json").read_text())["rates"].keys() == res["rates"].keys()
    with pytest.raises(ValueError, match="int4"):
        run(fake_llama_cpp, size="L1-D64", formats=("int4",), cache_dir=cache)
