"""eval/carry_real.py: with the attention cut, only the carried state crosses the boundary, so a silent block scores
carried = zeroed and an awake one does not; the window arm reads the previous chunk; --quick writes the shape."""

import json

import carry_real as script  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import torch


def windows(chunk: int = 8, count: int = 4):
    stream = torch.randint(1, 97, (256,), generator=torch.Generator().manual_seed(0))
    return script.draw_windows(stream, chunk, count, seed=0)


def test_a_silent_block_carries_nothing_and_an_awake_one_does():
    first, second = windows()
    silent = script.tiny_carry_model()
    with torch.no_grad():
        for name, param in silent.named_parameters():
            if name.endswith("out_proj.weight"):
                param.zero_()  # the block adds exactly nothing: only attention could carry, and it is cut
    carried = script.chunk_ce(silent, first, second, "carried", batch=2)
    zeroed = script.chunk_ce(silent, first, second, "alone", batch=2)
    assert abs(carried - zeroed) < 1e-5
    awake = script.tiny_carry_model()
    gap = script.chunk_ce(awake, first, second, "carried", 2) - script.chunk_ce(awake, first, second, "alone", 2)
    assert abs(gap) > 1e-4  # the carried state reaches the second chunk's logits (3e-4 measured; silent: 0.0)


def test_the_window_arm_reads_the_previous_chunk():
    first, second = windows()
    base = script.without_carry(script.tiny_carry_model())
    assert base.config.ctm_carry == "none"
    window = script.chunk_ce(base, first, second, "window", batch=4)
    alone = script.chunk_ce(base, first, second, "alone", batch=4)
    assert abs(window - alone) > 1e-3
    with torch.no_grad():  # the window's second half is what one forward over both chunks predicts there
        full = base(torch.cat([first, second], 1)).logits[:, 8:]
    torch.testing.assert_close(script.second_chunk_logits(base, first, second, "window"), full, atol=1e-5, rtol=1e-5)


def test_quick_writes_the_experiment_shape(tmp_path):
    result = script.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == set(script.ARMS) and set(saved["gains"]) == {"carried_over_zeroed", "ceiling"}
    record = result["per_seed"][0]
    expected = record["zeroed"]["ce"] - record["carried"]["ce"]
    assert abs(record["carried_over_zeroed"] - expected) < 1e-12
    assert "carried over zeroed" in (tmp_path / "results.md").read_text()
