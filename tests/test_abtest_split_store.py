"""The shared split: atomic file writes, serialised updates, change detection, the ConfigMap object."""

import json
import os
import threading

import pytest

from abtest.split_store import (
    ConfigMapSplitStore,
    FileSplitStore,
    SplitState,
    SplitStoreError,
    SplitWatcher,
    dump_state,
    parse_state,
    with_change,
)


def test_state_round_trips_and_changes_are_logged(tmp_path):
    s = with_change(
        SplitState(),
        "tau-ab",
        {"baseline": 0.99, "mame-0.8": 0.01},
        action="set",
        source="judge",
        ramp_step=0,
        now=100.0,
    )
    s = with_change(
        s,
        "tau-ab",
        {"baseline": 1.0, "mame-0.8": 0.0},
        action="rollback",
        source="judge",
        reason="agreement fails",
        now=200.0,
    )
    e = s.experiments["tau-ab"]
    assert (e.version, e.started, e.step_started, e.ramp_step) == (2, 100.0, 200.0, None)
    assert [c.action for c in e.changes] == ["set", "rollback"]
    assert e.changes[-1].split_before == {"baseline": 0.99, "mame-0.8": 0.01}
    assert parse_state(dump_state(s)) == s
    assert parse_state('{"experiments": {"x": {"split": {"a": 1}}}}').experiments["x"].split == {
        "a": 1.0
    }  # JSON


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiments: {x: {split: {a: 0.5}}}", "sum to 0.5"),
        ("experiments: {x: {split: {a: 1}, colour: red}}", "colour"),
        ("experiments: {x: {split: {a: 1}, ramp_step: -1}}", "ramp_step"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_documents_are_refused_with_the_key(text, message):
    with pytest.raises(SplitStoreError, match=message):
        parse_state(text, "splits.yaml")


def test_file_store_writes_atomically_and_serialises_concurrent_updates(tmp_path):
    store = FileSplitStore(tmp_path / "splits.yaml")
    assert store.read() == SplitState()
    store.update(lambda s: with_change(s, "e", {"a": 1.0, "b": 0.0}, action="set", source="op"))

    def bump(i):
        # each update reads the version written by the one before it: none is lost
        store.update(
            lambda s: with_change(s, "e", {"a": 1 - i / 100, "b": i / 100}, action="set", source=f"t{i}")
        )

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entry = store.read().experiments["e"]
    assert entry.version == 9 and len(entry.changes) == 9
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left


def test_watcher_sees_changes_only_and_keeps_the_last_good_state(tmp_path):
    path = tmp_path / "splits.yaml"
    store, watcher = FileSplitStore(path), SplitWatcher(path)
    assert watcher.poll() is None and watcher.last_error  # no file yet
    store.write(with_change(SplitState(), "e", {"a": 1.0}, action="set", source="op", now=1.0))
    first = watcher.poll()
    assert first is not None and first.experiments["e"].split == {"a": 1.0}
    assert watcher.poll() is None  # unchanged
    os.utime(path, ns=(1, 1))  # touched, same content: not a change
    assert watcher.poll() is None
    path.write_text("experiments: {e: {split: {a: 2}}}")  # invalid: the replica keeps its split
    assert watcher.poll() is None and "weight" in watcher.last_error and watcher.state == first
    store.write(with_change(first, "e", {"a": 0.5, "b": 0.5}, action="set", source="op", now=2.0))
    assert watcher.poll().experiments["e"].split == {"a": 0.5, "b": 0.5} and watcher.last_error is None


def test_watcher_follows_a_configmap_style_symlink_swap(tmp_path):
    """The kubelet updates a mounted ConfigMap by re-pointing the ..data symlink at a new folder."""
    for version, weight in (("v1", 1.0), ("v2", 0.5)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "splits.yaml").write_text(
            dump_state(
                with_change(
                    SplitState(), "e", {"a": weight, "b": 1 - weight}, action="set", source="op", now=1.0
                )
            )
        )
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "splits.yaml").symlink_to("..data/splits.yaml")
    watcher = SplitWatcher(tmp_path / "splits.yaml")
    assert watcher.poll().experiments["e"].split["a"] == 1.0
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watcher.poll().experiments["e"].split["a"] == 0.5


def test_configmap_patch_carries_the_document_and_the_resource_version():
    """No API server runs here: this checks the patch the store sends (JSON, as the client sends it)."""
    state = with_change(
        SplitState(), "tau-ab", {"baseline": 1.0, "mame-0.8": 0.0}, action="rollback", source="judge", now=5.0
    )
    patch = json.loads(
        json.dumps(ConfigMapSplitStore("mame-splits", "mame", api=object()).patch(state, "4711"))
    )
    assert patch["metadata"] == {"resourceVersion": "4711"} and list(patch["data"]) == ["splits.yaml"]
    assert parse_state(patch["data"]["splits.yaml"]) == state


def test_configmap_update_retries_on_a_conflict():
    kubernetes = pytest.importorskip("kubernetes")
    from kubernetes.client.exceptions import ApiException

    class Api:  # stands in for the API server's two calls: a conflict first, then success
        def __init__(self):
            self.cm = kubernetes.client.V1ConfigMap(
                metadata=kubernetes.client.V1ObjectMeta(name="s", namespace="n", resource_version="1"),
                data={},
            )
            self.patches = []

        def read_namespaced_config_map(self, name, namespace):
            return self.cm

        def patch_namespaced_config_map(self, name, namespace, body, _content_type=None):
            assert _content_type == "application/merge-patch+json"
            self.patches.append(body)
            if len(self.patches) == 1:
                raise ApiException(status=409, reason="Conflict")
            self.cm.data = {**self.cm.data, **body["data"]}

    api = Api()
    store = ConfigMapSplitStore("s", "n", api=api)
    store.update(lambda s: with_change(s, "e", {"a": 1.0}, action="set", source="op"))
    assert len(api.patches) == 2 and store.read().experiments["e"].split == {"a": 1.0}


def test_operator_command_sets_and_shows_the_split(tmp_path, capsys):
    from abtest.split_store import main

    path = tmp_path / "splits.yaml"
    main(["--store", f"file:{path}", "set", "tau-ab", "baseline=0.9", "mame-0.8=0.1", "--reason", "start"])
    main(["--store", str(path), "show"])
    shown = parse_state(capsys.readouterr().out.split("\n", 1)[1])
    assert shown.experiments["tau-ab"].split == {"baseline": 0.9, "mame-0.8": 0.1}
    assert shown.experiments["tau-ab"].changes[-1].source == "operator"
    with pytest.raises(SystemExit, match="sum to 0.5"):
        main(["--store", str(path), "set", "tau-ab", "baseline=0.5"])
    with pytest.raises(SystemExit, match="VARIANT=WEIGHT"):
        main(["--store", str(path), "set", "tau-ab", "baseline"])
    assert FileSplitStore(path).read().experiments["tau-ab"].version == 1  # refused changes wrote nothing
