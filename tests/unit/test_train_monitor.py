"""Step lines, the progress bar (terminal only), metrics.jsonl and peak memory."""
import io
import json

from mf_longseq.train.monitor import Monitor, ProgressBar, StepRecord, peak_rss_mib, read_metrics


class Terminal(io.StringIO):
    def isatty(self):
        return True


def record(step, loss=2.0):
    return StepRecord(step=step, loss=loss, tokens=1000, seconds=0.5, lr=1e-3, peak_rss_mib=[812.4, 790.0])


def test_line_names_loss_throughput_and_memory_of_every_rank():
    line = record(3, 1.234567891).line(20)
    assert line == ("step  3/20 | loss 1.234568 | 2,000 tok/s | 0.50 s | lr 0.001 | "
                    "peak RSS per rank (MiB): 812 790")


def test_bar_only_on_a_terminal():
    plain, tty = io.StringIO(), Terminal()
    for stream in (plain, tty):
        bar = ProgressBar(4, stream, width=8)
        bar.draw(2)
        bar.clear()
    assert plain.getvalue() == ""
    assert "\r[####....] 2/4 eta" in tty.getvalue()


def test_monitor_writes_rank0_lines_and_metrics(tmp_path):
    out = Terminal()
    mon = Monitor(0, 2, str(tmp_path), stream=out)
    mon.record(record(1))
    mon.record(record(2, 1.5))
    mon.close()
    assert "step 1/2 | loss 2.000000" in out.getvalue() and "] 2/2 eta" in out.getvalue()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["tokens_per_second"] == 2000
    quiet = io.StringIO()
    Monitor(1, 2, str(tmp_path), stream=quiet).record(record(1))             # other ranks: silent, no file
    assert quiet.getvalue() == "" and len(read_metrics(str(tmp_path))) == 2
    Monitor(0, 4, str(tmp_path), stream=io.StringIO(), start_step=1)          # resuming after step 1
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1]


def test_peak_rss_is_positive():
    assert peak_rss_mib() > 10
