"""The tokenizer comes from the model (issue 12): cl100k_base for the K-SSMs and for a Mamba
trained here, a Phase-Mamba's base's own tokenizer (read by mlx-lm) otherwise; the data
pipeline, sampling and the comparison all use it, and the token cache keys on it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args
from phase_helpers import CORPUS, make_hf_tokenizer, write_base
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm.cli.app import app
from mlx_kssm.data import DataError, group_documents, prepare_tokens, resolve_source
from mlx_kssm.generate import decode_tokens, encode_prompt
from mlx_kssm.models.phase_base import random_base
from mlx_kssm.models.phase_mamba import args_for_base
from mlx_kssm.tokenizer import (
    Cl100k,
    HFTokenizer,
    TokenizerUnavailable,
    cl100k,
    tokenizer_for,
)

VOCAB = 300  # the test tokenizer's; the bases have as many ids
TEXT = "Héllo wörld, the 中 city!\n  two  spaces and the end."
runner = CliRunner()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KSSM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "hf", VOCAB)


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFTokenizer(hf_dir)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, hf_dir):
    """Three bases: with tokenizer files, with cl100k_base named in config.json, with neither."""
    root = tmp_path_factory.mktemp("bases")
    base = random_base(VOCAB, 32, 2, seed=0)
    return {
        "files": write_base(root / "files", base, tokenizer_files=hf_dir),
        "named": write_base(root / "named", base, tokenizer="cl100k_base"),
        "none": write_base(root / "none", base),
    }


def test_tokenizer_for_follows_the_models_record(bases, hf_dir, tmp_path):
    assert isinstance(tokenizer_for(tiny_args()), Cl100k)  # K-SSM v3
    assert tokenizer_for(SimpleNamespace(tokenizer="cl100k_base")) is cl100k()
    with pytest.raises(TokenizerUnavailable, match="'gpt9'; known: cl100k_base"):
        tokenizer_for(SimpleNamespace(tokenizer="gpt9"))
    phase = tokenizer_for(args_for_base(bases["files"]))
    assert isinstance(phase, HFTokenizer) and phase.folder == bases["files"].resolve()
    assert tokenizer_for(args_for_base(bases["named"])) is cl100k()
    with pytest.raises(TokenizerUnavailable) as err:
        tokenizer_for(args_for_base(bases["none"]))
    assert "no tokenizer files" in str(err.value) and "\n" not in str(err.value)
    assert tokenizer_for(SimpleNamespace(base_path=None)) is cl100k()  # a random base
    # A model loaded from an mlx-lm folder uses that folder's tokenizer files ...
    assert isinstance(tokenizer_for(SimpleNamespace(tokenizer=None), bases["files"]), HFTokenizer)
    # ... and a Mamba folder with neither files nor a name is an error, not cl100k by chance.
    with pytest.raises(TokenizerUnavailable, match="no tokenizer files"):
        tokenizer_for(SimpleNamespace(tokenizer=None), bases["none"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerUnavailable, match="cannot read the tokenizer"):
        HFTokenizer(broken)


def test_hf_stream_is_the_decoded_text_and_survives_unknown_ids(hf):
    ids = hf.encode(TEXT)
    assert hf.eot == 0 and hf.n_vocab == VOCAB and 0 not in ids
    stream = hf.stream()
    pieces = [stream.add(t) for t in ids]
    assert "".join(pieces) + stream.flush() == TEXT == hf.decode(ids)
    assert "" in pieces  # a multi-byte character was held back until complete
    assert decode_tokens(ids, hf) == TEXT
    assert hf.decode([ids[0], VOCAB + 5, ids[1]]) == hf.decode([ids[0]]) + "\ufffd" + hf.decode(
        [ids[1]]
    )
    assert encode_prompt("", hf) == [0] and encode_prompt("", None) == [cl100k().eot]


def test_identity_tells_tokenizers_apart(hf, hf_dir, tmp_path):
    other = make_hf_tokenizer(tmp_path / "other", VOCAB, text="zzz yyy xxx " * 200)
    a, b = hf.identity(), HFTokenizer(other).identity()
    assert a["name"] == b["name"] == "hf" and a != b
    assert cl100k().identity()["name"] == "cl100k_base"
    assert HFTokenizer(hf_dir).identity() == a  # the same files: the same identity


def test_data_is_tokenised_with_the_models_tokenizer_and_cached_apart(hf, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("First document here.\n\nSecond one, ü.\n")
    (corpus / "valid.txt").write_text("A held-out line.\n")
    source = resolve_source(str(corpus))
    data = prepare_tokens(source, tokenizer=hf)
    docs = list(group_documents(["First document here.\n", "\n", "Second one, ü.\n"]))
    expected = [t for doc in docs for t in hf.encode(doc) + [hf.eot]]
    assert data.train.tolist() == expected
    assert data.meta["tokenizer"] == hf.identity()
    plain = prepare_tokens(source)  # cl100k_base: another cache folder, both kept
    assert plain.folder != data.folder and plain.meta["tokenizer"]["name"] == "cl100k_base"
    stamp = (data.folder / "tokens.train.bin").stat().st_mtime_ns
    again = prepare_tokens(source, tokenizer=lambda: hf)  # asked for lazily
    assert again.folder == data.folder
    assert (again.folder / "tokens.train.bin").stat().st_mtime_ns == stamp  # reused
    # A token folder made by one tokenizer is refused for a model with another.
    with pytest.raises(DataError, match="another tokenizer \\(cl100k_base\\)"):
        prepare_tokens(resolve_source(str(plain.folder)), tokenizer=hf)
    assert prepare_tokens(resolve_source(str(data.folder)), tokenizer=hf).train.size


# ---------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def phase_model(bases, tmp_path_factory):
    mx.random.seed(0)
    args = args_for_base(bases["files"], coupling="additive", dynamics="per_token")
    return mlx_kssm.save(mlx_kssm.build_model(args), tmp_path_factory.mktemp("pm") / "pm")


def test_sample_encodes_and_decodes_with_the_bases_tokenizer(phase_model, hf, tmp_path):
    out = tmp_path / "s.json"
    res = runner.invoke(
        app,
        ["sample", "--model", str(phase_model), "--prompt", "The city", "--temp", "0"]
        + ["--max-tokens", "5", "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    (gen,) = json.loads(out.read_text())["generations"]
    assert gen["prompt_tokens"] == hf.encode("The city")
    assert gen["text"] == hf.decode(gen["tokens"]) and res.stdout.startswith("The city")


def test_compare_refuses_models_with_different_tokenizers(phase_model, tmp_path):
    mx.random.seed(0)
    v3 = mlx_kssm.save(mlx_kssm.Model(tiny_args(vocab_size=100_277)), tmp_path / "v3")
    res = runner.invoke(app, ["compare", str(v3), str(phase_model), "--trials", "1"])
    assert res.exit_code == 2 and "different tokenizers" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_training_a_phase_mamba_tokenises_with_its_base(bases, hf, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(CORPUS.read_text(encoding="utf-8")[:12_000])
    (corpus / "valid.txt").write_text(CORPUS.read_text(encoding="utf-8")[12_000:16_000])
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "--arch", "phase_mamba", "--base", str(bases["files"]), "--preset", "tiny"]
        + ["--data", str(corpus), "--out", str(out), "--steps", "2", "--batch-size", "2"]
        + ["--seq-length", "16", "--eval-every", "2", "--eval-batches", "1"]
        + ["--sample-tokens", "4", "--set", "coupling=additive"],
    )
    assert res.exit_code == 0, res.output
    config = json.loads((out / "train_config.json").read_text())
    assert config["data"]["tokenizer"] == hf.identity()
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"eval"' in line]
    prompt, _, tail = row["sample"].partition("|")
    assert prompt and not prompt.replace(" ", "").isdigit()  # text, not token ids
    train = np.fromfile(next((tmp_path / "cache").rglob("tokens.train.bin")), dtype=np.int32)
    assert train.max() < VOCAB
