"""Conversations with images -> examples: where the images go, which tokens are trained (token by token), the
bad-input errors naming the record, and the batch's image tensors."""
import base64
import io

import pytest
import torch
from PIL import Image

from velotune.data.encode import IGNORE_INDEX
from velotune.data.vision_data import VisionStats, collate_images, encode_vision, read_vision_record
from velotune.errors import DataError

from vision_fixtures import QUESTION, digit_pngs, digit_records


@pytest.fixture(scope="module")
def parts(tiny_llava):
    from transformers import AutoTokenizer

    from velotune.vision.processor import image_processor_for
    return AutoTokenizer.from_pretrained(str(tiny_llava)), image_processor_for(tiny_llava)


def _encode(record, parts, folder, max_len=128, fmt="messages"):
    tokenizer, processor = parts
    sample, refs = read_vision_record(record, fmt, "train.jsonl:1", placeholder=processor.placeholder)
    stats = VisionStats()
    example = encode_vision(sample, refs, processor, tokenizer, tokenizer.chat_template, train_on="assistant",
                            max_len=max_len, overflow="truncate", stats=stats, base_dir=folder)
    return example, stats


def test_only_the_answer_is_trained_token_by_token(parts, tmp_path):
    tokenizer, processor = parts
    [(path, label)] = digit_pngs(tmp_path, 1)
    example, stats = _encode(digit_records([(path, label)], tmp_path)[0], parts, tmp_path)
    ids, labels = example.input_ids.tolist(), example.labels.tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 4 == sum(processor(list(map(Image.open, [path]))).tokens_per_image)
    trained = [tokenizer.decode([i]) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert "".join(trained) == f"{label}<|im_end|>"          # the answer and its end of turn, nothing else
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == image_id)
    text = tokenizer.decode(ids)
    assert text.startswith("<|bos|><|im_start|>user\n<image><image><image><image>" + QUESTION)
    assert example.images["pixel_values"].shape == (1, 3, 16, 16)
    assert stats.images == 1 and stats.samples == 1


def test_images_column_llava_placeholders_and_data_uris(parts, tmp_path):
    (a, _), (b, _) = digit_pngs(tmp_path, 2)
    buffer = io.BytesIO()
    Image.open(b).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    record = {"images": [a.name, uri],
              "conversations": [{"from": "human", "value": "<image>\nand <image>: which digits?"},
                                {"from": "gpt", "value": "0 and 1"}]}
    example, _ = _encode(record, parts, tmp_path, fmt="sharegpt")
    assert example.num_images == 2 and example.images["pixel_values"].shape[0] == 2
    # the data URI decodes to the same pixels as the file
    assert torch.equal(example.images["pixel_values"][1], _encode(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]},
                      {"role": "assistant", "content": "1"}]}, parts, tmp_path)[0].images["pixel_values"][0])


@pytest.mark.parametrize("record, message", [
    ({"images": ["a.png"], "messages": [{"role": "user", "content": "two <image> <image>"},
                                        {"role": "assistant", "content": "x"}]}, "more image places than images"),
    ({"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": [{"type": "image"}]},
                                                 {"role": "assistant", "content": "x"}]},
     "holds 2 image(s) but the conversation has 1 place"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]},
     "images in assistant turns are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                   {"role": "assistant", "content": "x"}]}, "unknown part type 'video'"),
])
def test_image_places_that_do_not_match_are_errors_naming_the_record(parts, record, message):
    with pytest.raises(DataError, match="train.jsonl:1") as err:
        read_vision_record(record, "messages", "train.jsonl:1", placeholder="<image>")
    assert message in str(err.value)


def test_missing_and_unreadable_images_name_the_record_and_file(parts, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for name in ("missing.png", "broken.png"):
        record = {"messages": [{"role": "user", "content": [{"type": "image", "image": name}]},
                               {"role": "assistant", "content": "x"}]}
        with pytest.raises(DataError) as err:
            _encode(record, parts, tmp_path)
        assert "train.jsonl:1" in str(err.value) and name in str(err.value)


def test_a_sample_cut_inside_its_image_tokens_is_dropped_and_counted(parts, tmp_path):
    [(path, label)] = digit_pngs(tmp_path, 1)
    example, stats = _encode(digit_records([(path, label)], tmp_path)[0], parts, tmp_path, max_len=6)
    assert example is None and stats.cut_in_images == 1 and stats.samples == 0


def test_collate_joins_images_in_order_and_pads_per_sample_stacks():
    a, b = torch.ones(1, 3, 2, 2), 2 * torch.ones(2, 3, 2, 2)
    batch = collate_images([{"pixel_values": a}, {}, {"pixel_values": b}])
    assert torch.equal(batch["pixel_values"], torch.cat([a, b]))
    stacks = collate_images([{"pixel_values": torch.ones(1, 1, 3, 2, 2),
                              "pixel_attention_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool)},
                             {"pixel_values": torch.ones(1, 2, 3, 2, 2),
                              "pixel_attention_mask": torch.ones(1, 2, 2, 2, dtype=torch.bool)}])
    assert stacks["pixel_values"].shape == (2, 2, 3, 2, 2) and not stacks["pixel_values"][0, 1].any()
    assert stacks["pixel_attention_mask"].shape == (2, 2, 2, 2)
