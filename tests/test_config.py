"""small_model_config, the one builder of small configs: its layer pattern, as ModelArgs reads it."""

import pytest

from mlx_dgemma.config import ModelArgs, small_model_config
from tests.fixtures import tiny

SIZES = dict(vocab_size=64, canvas_length=8, hidden_size=32, num_hidden_layers=3, intermediate_size=48,
             num_attention_heads=2, head_dim=16, num_experts=2, top_k_experts=1, moe_intermediate_size=16,
             sliding_window=8, max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2)


def test_the_last_layer_is_the_only_full_one_by_default():
    args = ModelArgs.from_dict(small_model_config(**SIZES))
    assert [args.is_full(i) for i in range(3)] == [False, False, True]
    assert (args.layer_head_dim(0), args.layer_head_dim(2), args.layer_kv_heads(0), args.layer_kv_heads(2)) == (
        16, 32, 1, 1)


def test_layer_types_gives_another_pattern():
    pattern = ["full_attention", "sliding_attention", "full_attention"]
    config = small_model_config(**SIZES, layer_types=pattern)
    assert ModelArgs.from_dict(config).layer_types == pattern
    # the reference harness's model: a full layer before the last, K/V sizes as the released model's
    args = ModelArgs.from_dict(tiny.reference_config())
    assert [args.layer_head_dim(i) for i in range(4)] == [16, 16, 32, 32]
    assert [args.layer_kv_heads(i) for i in range(4)] == [2, 2, 1, 1]
    assert (args.canvas_length, args.sliding_window, args.eos_token_ids) == (16, 8, [1, 106, 50])


@pytest.mark.parametrize("pattern", [
    ["sliding_attention", "full_attention"],  # too short
    ["full_attention", "full_attention", "sliding_attention"],  # the last layer must be full
    ["sliding_attention", "local_attention", "full_attention"],  # not a layer type
])
def test_bad_layer_types_are_refused_in_one_line(pattern):
    with pytest.raises(ValueError, match=r"^layer_types \[.*\]: expected 3 of 'sliding_attention' or 'full_attention'"
                                         r", the last one 'full_attention'$"):
        small_model_config(**SIZES, layer_types=pattern)
