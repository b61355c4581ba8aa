"""The served app under load, as people on one share link use it: the real gradio server (smoke weights) driven
through gradio_client, one client per person (each its own browser session).

Eight people press Generate at once and get their pictures in line order, and more than the line holds are told
how many are ahead; a person who closes the page gives up their place; one person's Stop stops only their own
picture; a hundred pictures in a row keep the server's memory flat and leave no temporary file behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import threading
import time
from pathlib import Path

import psutil
import pytest
from gradio_client import Client, handle_file

from instantid_colab import app, smoke

LONG = dict(steps=100, size="512x512")  # some ten seconds on the smoke weights
QUICK = dict(steps=1, size="64x64")
MIB = 2**20


@pytest.fixture(scope="module")
def served(smoke_session, tmp_path_factory):
    """The app on a free port with a line the tests can watch; closed (and its temporary folder gone) after."""
    face = tmp_path_factory.mktemp("faces") / "face.png"
    smoke.sample_face_image().save(face)
    line = app.GpuLine()
    launched = app.launch(smoke_session, share=False, block=False, line=line)
    yield launched, line, str(face)
    launched.app.close()


def generate(client: Client, face: str, seed: int, **settings):
    return client.submit(face_path=handle_file(face), seed=seed, randomize_seed=False, **settings,
                         api_name="/generate")


def until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_eight_people_at_once_get_their_pictures_in_line_order_and_more_are_told_how_many_are_ahead(served):
    launched, line, face = served
    clients = [Client(launched.local_url, verbose=False) for _ in range(app.LINE_LIMIT + 2)]
    jobs, finished = [], []
    hold = threading.Event()
    line.worker.submit(hold.wait)  # the GPU is busy until all ten have clicked: no picture ends before they do
    for seed, client in enumerate(clients, 1):
        jobs.append(generate(client, face, seed, steps=30, size="128x128"))  # ~1 s apart: arrivals keep their order
        # each has clicked, in this order: in line, or (beyond the limit) refused before the next one clicks
        until(lambda: jobs[-1].done() if seed > app.LINE_LIMIT else len(line) == seed)
    hold.set()

    def wait(seed, job):
        try:
            finished.append((seed, job.result()[1]))
        except Exception as error:  # gradio_client's AppError: the page's message
            finished.append((seed, str(error)))

    threads = [threading.Thread(target=wait, args=(seed, job)) for seed, job in enumerate(jobs, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    made = [(seed, result) for seed, result in finished if isinstance(result, int)]
    busy = [result for _, result in finished if not isinstance(result, int)]
    assert made == [(seed, seed) for seed in range(1, app.LINE_LIMIT + 1)]  # each their own seed, in line order
    assert len(busy) == 2 and all(f"Busy: {app.LINE_LIMIT} pictures are ahead of you" in text for text in busy)
    assert len(line) == 0


def test_a_person_who_closes_the_page_gives_up_their_place(served):
    launched, line, face = served
    script = (f"from gradio_client import Client, handle_file\n"
              f"Client({launched.local_url!r}, verbose=False).predict(face_path=handle_file({face!r}), steps=100, "
              f"size='128x128', api_name='/generate')\n")
    leaving = subprocess.Popen([sys.executable, "-c", script])
    try:
        until(lambda: len(line) == 1)  # their picture is being made
        started = time.monotonic()
        waiting = generate(Client(launched.local_url, verbose=False), face, 7, **QUICK)
        until(lambda: len(line) == 2)
        leaving.kill()  # the page closes: no goodbye, the connection just ends
        assert waiting.result(timeout=60)[1] == 7
        assert time.monotonic() - started < 30  # its 100 steps at 512 px take longer: the closed page's run stopped
    finally:
        leaving.kill()
    until(lambda: len(line) == 0)


def test_one_persons_stop_leaves_the_others_pictures_intact(served):
    launched, line, face = served
    ann, bob, cy = (Client(launched.local_url, verbose=False) for _ in range(3))
    ann_job = generate(ann, face, 1, **LONG)
    until(lambda: len(line) == 1)
    bob_job = generate(bob, face, 2, **QUICK)
    cy_job = generate(cy, face, 3, **QUICK)
    until(lambda: len(line) == 3)
    ann.predict(api_name="/stop")
    assert ann_job.result(timeout=60)[4].startswith("Stopped (stopped after step ")
    assert bob_job.result(timeout=60)[1] == 2 and cy_job.result(timeout=60)[1] == 3
    assert len(bob_job.result()[0]) == 1 and len(cy_job.result()[0]) == 1


def test_a_hundred_pictures_in_a_row_keep_the_servers_memory_flat_and_leave_no_temporary_file(tmp_path):
    """The server as `python -m instantid_colab app --smoke` runs it, in a process of its own (its memory is the
    server's alone), its temporary folder under TMPDIR; Ctrl-C at the end."""
    face = tmp_path / "face.png"
    smoke.sample_face_image().save(face)
    port = _free_port()
    server = _command_line_app(port, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/"
        until(lambda: _answers(url), seconds=180)
        client, measured = Client(url, verbose=False), psutil.Process(server.pid)
        for seed in range(100):
            assert client.predict(face_path=handle_file(str(face)), seed=seed, randomize_seed=False, **QUICK,
                                  api_name="/generate")[1] == seed
            if seed == 9:
                after_ten = measured.memory_info().rss
        grown = (measured.memory_info().rss - after_ten) / MIB
        print(f"the server's resident memory grew by {grown:.1f} MiB over pictures 11 to 100")
        assert grown < 50
        (folder,) = tmp_path.glob("instantid-app-*")  # gradio's uploads and pictures: the app's own folder
        assert any(path.is_file() for path in folder.rglob("*"))
        server.send_signal(signal.SIGINT)
        assert _exit_code(server, tmp_path) == 0  # a loaded machine closes gradio slowly
        assert not folder.exists()
    finally:
        server.kill()


def test_the_app_stopped_with_sigterm_closes_and_removes_its_folder(tmp_path):
    """`kill` or `timeout` stops the command-line app as Ctrl-C does: closed, its temporary folder gone."""
    port = _free_port()
    server = _command_line_app(port, tmp_path)
    try:
        until(lambda: _answers(f"http://127.0.0.1:{port}/"), seconds=180)
        (folder,) = tmp_path.glob("instantid-app-*")
        server.send_signal(signal.SIGTERM)
        assert _exit_code(server, tmp_path, 60) in (0, 130)  # 130: it came while the app was still starting, as a Ctrl-C would
        assert not folder.exists()
    finally:
        server.kill()


def test_the_apps_temporary_files_are_swept_once_old(served, monkeypatch):
    launched, _, face = served
    Client(launched.local_url, verbose=False).predict(face_path=handle_file(face), **QUICK, api_name="/generate")
    assert any(path.is_file() for path in Path(launched.cache).rglob("*"))
    monkeypatch.setattr(app, "CACHE_SWEEP_S", 1)
    monkeypatch.setattr(app, "CACHE_AGE_S", 0)
    until(lambda: not any(path.is_file() for path in Path(launched.cache).rglob("*")), seconds=10)


def _command_line_app(port: int, tmp: Path) -> subprocess.Popen:
    """`python -m instantid_colab app --smoke` on `port`, in a process of its own, its temporary folder under `tmp`;
    its output in `tmp/server.log` (with faulthandler on: `_exit_code` dumps its threads when it does not close)."""
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "instantid_colab", "app", "--smoke",
                             "--no-share", "--port", str(port)], env=_server_environment(tmp),
                            stdout=(tmp / "server.log").open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=_ctrl_c_as_at_a_terminal)


def _ctrl_c_as_at_a_terminal() -> None:
    """SIGINT back to its default in the server: a shell that runs this suite in the background (`... &`) makes its
    children ignore SIGINT, and Python keeps an ignored SIGINT ignored, so the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _exit_code(server: subprocess.Popen, tmp: Path, seconds: float = 180) -> int:
    """The server's exit code once it closes; when it does not within `seconds`, fails with where its threads wait."""
    try:
        return server.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
        server.wait(timeout=30)
        pytest.fail(f"the server did not close within {seconds:g} s; its threads:\n"
                    f"{(tmp / 'server.log').read_text(errors='replace')[-6000:]}")


def _server_environment(tmp: Path) -> dict[str, str]:
    """This environment with TMPDIR in `tmp`, less the temporary folder an app of this process gave gradio."""
    return {**{key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}, "TMPDIR": str(tmp)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_file_that_is_not_a_picture_sent_to_the_api_is_refused_in_our_words(served, tmp_path):
    """gradio itself reads the upload first; its own refusal ("Could not preprocess input component at index 0")
    becomes the sentence the page gives for any picture field."""
    launched, _, _ = served
    note = tmp_path / "t.jpg"
    note.write_text("a shopping list, not a photo")
    with pytest.raises(Exception, match=r"face photo: t\.jpg is not a picture") as refused:
        Client(launched.local_url, verbose=False).predict(face_path=handle_file(str(note)), **QUICK,
                                                          api_name="/generate")
    assert "Could not preprocess" not in str(refused.value)
