"""plot.py: a run's loss curves as a PNG, drawn with PIL."""
import json

import numpy as np
import pytest
from PIL import Image

import plot


def write_metrics(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_the_curves_are_drawn_where_their_values_are(tmp_path):
    rows = [{"step": s, "loss": 2.0 * 0.99 ** s, "loss_lm": 0.5, "loss_mask": 0.2, "loss_dice": 0.1} for s in range(1, 301)]
    for r in rows[::7]:  # steps without a mask: no mask terms, not a fall to log(0)
        r["loss_mask"] = r["loss_dice"] = 0.0
    write_metrics(tmp_path / "metrics.jsonl", rows)
    plot.main([str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"), "--title", "a run"])
    im = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert im.shape == (plot.H, plot.W, 3)
    colors = dict(plot.TERMS)
    for name, value in (("loss_lm", 0.5), ("loss_mask", 0.2), ("loss_dice", 0.1)):
        hit = np.all(im[:, plot.LEFT + 50:plot.W - plot.RIGHT - 5] == colors[name], axis=-1)  # the plot area
        rows_hit = np.nonzero(hit.any(1))[0]
        assert len(rows_hit), name
        # a flat curve: one row, at the height of its value on the log axis (decades 0.01 to 10)
        expected = (plot.H - plot.BOTTOM) - (np.log10(value) + 2) / 3 * (plot.H - plot.BOTTOM - plot.TOP)
        assert abs(np.median(rows_hit) - expected) <= 2, (name, rows_hit, expected)
    loss = np.nonzero(np.all(im[:, :plot.W - plot.RIGHT] == colors["loss"], axis=-1))
    left, right = loss[1].argmin(), loss[1].argmax()
    assert loss[0][left] < loss[0][right] - 100  # a falling loss ends lower in the picture than it starts


@pytest.mark.parametrize("content,message", [
    ('{"step": 1, "loss": 1.0}\n', "at least 2"),
    ("not json\n", "is not JSON"),
    ('{"step": 1}\n{"step": 2}\n', "has no step and loss"),
])
def test_bad_metrics_are_one_line_errors(tmp_path, capsys, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "m.jsonl"), str(tmp_path / "out.png")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()
