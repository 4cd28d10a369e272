"""Saved models: every learned array survives the round trip, and a model that was edited,
damaged or cut short is refused with the array named."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

import blockals
from blockals.cli import main
from blockals.recstore import read_recommendations
from conftest import cluster_client

MODES = {"explicit": {}, "biased": {"biases": True}, "wals": {"weighting": "wals"}}


def made_model(mode, n_users=7, n_items=5, rank=3, ids="int"):
    """A model with learned attributes set directly: storage is tested, not training."""
    rng = np.random.default_rng(0)
    model = blockals.ALS(rank=rank, reg=0.2, seed=4, **MODES[mode])
    model.user_factors_ = rng.standard_normal((n_users, rank)).astype(np.float32)
    model.item_factors_ = rng.standard_normal((n_items, rank)).astype(np.float32)
    if ids == "int":
        model.user_ids_, model.item_ids_ = np.arange(n_users) * 10, np.arange(n_items) + 100
    else:
        model.user_ids_ = np.array([f"u{i}" for i in range(n_users)], dtype=object)
        model.item_ids_ = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    if mode == "biased":
        model.user_bias_, model.item_bias_, model.global_mean_ = rng.random(n_users), rng.random(n_items), 3.25
    if mode == "wals":
        model.user_weights_, model.item_weights_ = rng.random(n_users), rng.random(n_items)
    model.history_ = [{"iteration": 1, "loss": 1.5, "train_rmse": 0.5, "seconds": 0.1, "bytes_routed": 10}]
    model.config_ = {"rank": rank}
    model.store_path_ = "/data/r.zarr"
    return model


@pytest.mark.parametrize("mode", list(MODES))
def test_every_learned_attribute_survives_the_round_trip(mode, tmp_path):
    model = made_model(mode)
    model.save(tmp_path / "m.zarr")
    loaded = blockals.ALS.load(tmp_path / "m.zarr")
    for name in ("user_factors_", "item_factors_", "user_ids_", "item_ids_", "user_bias_", "item_bias_",
                 "user_weights_", "item_weights_"):
        assert hasattr(loaded, name) == hasattr(model, name), name
        if hasattr(model, name):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.get_params() == model.get_params()
    assert (loaded.history_, loaded.config_, loaded.store_path_) == (model.history_, model.config_, model.store_path_)
    if mode == "biased":
        assert loaded.global_mean_ == 3.25


def tamper(path, edit):
    root = zarr.open_group(str(path), mode="r+")
    edit(root)


def rewrite(name, value):
    def edit(root):
        del root[name]
        root.create_array(name, data=value)
    return edit


def edit_attrs(change):
    def edit(root):
        meta = dict(root.attrs["blockals"])
        change(meta)
        root.attrs["blockals"] = meta
    return edit


@pytest.mark.parametrize(
    "mode,edit,match",
    [
        ("biased", lambda root: root.__delitem__("user_bias"), r"m\.zarr/user_bias is missing from the model\."),
        ("wals", lambda root: root.__delitem__("item_weights"), r"m\.zarr/item_weights is missing from the model\."),
        ("explicit", rewrite("item_factors", np.ones((5, 4), np.float32)),
         r"m\.zarr/item_factors has shape \(5, 4\), but the model's rank is 3\."),
        ("explicit", rewrite("user_ids", np.arange(6)), r"m\.zarr/user_ids has shape \(6,\); the model has 7 users\."),
        ("explicit", rewrite("item_ids", np.array([1, 2, 2, 3, 4])), r"m\.zarr/item_ids holds an id twice\."),
        ("biased", rewrite("item_bias", np.ones(9)), r"m\.zarr/item_bias has shape \(9,\); the model has 5 items\."),
        ("explicit", edit_attrs(lambda m: m.pop("history")), r"m\.zarr/zarr\.json: key 'history' must be a list"),
        ("explicit", edit_attrs(lambda m: m["params"].update(rank=4)), r"user_factors has shape \(7, 3\), but the model's rank is 4"),
        ("explicit", edit_attrs(lambda m: m.update(complete=False)), r"m\.zarr is incomplete"),
        ("explicit", edit_attrs(lambda m: m.update(format_version=99)), r"has format version 99"),
        ("explicit", edit_attrs(lambda m: m["params"].update(ranks=4)), r"m\.zarr/zarr\.json: unknown key 'ranks' in 'params'; did you mean 'rank'\?$"),
    ],
    ids=["bias-missing", "weights-missing", "rank-changed", "ids-short", "ids-repeated", "bias-long", "no-history",
         "params-rank-edited", "incomplete", "newer-version", "unknown-param"],
)
def test_an_edited_model_is_refused_naming_what_is_wrong(mode, edit, match, tmp_path):
    path = tmp_path / "m.zarr"
    made_model(mode).save(path)
    tamper(path, edit)
    with pytest.raises(blockals.StoreError, match=match):
        blockals.ALS.load(path)


def test_a_model_is_never_written_over_something_else(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(blockals.InputError, match=r"exists and is not a blockals model; refusing to write over it"):
        made_model("explicit").save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_the_model_holds_no_pickle(tmp_path):
    made_model("biased").save(tmp_path / "m.zarr")
    for meta in (tmp_path / "m.zarr").rglob("zarr.json"):
        text = meta.read_text()
        assert "pickle" not in text.lower()
        json.loads(text)


def test_a_model_is_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "m.zarr"
    first, second = made_model("explicit", rank=3), made_model("biased", rank=2)
    first.save(path)
    with pytest.raises(blockals.InputError, match=r"m\.zarr already holds a complete model; pass overwrite=True "
                                                  r"\(--overwrite\) to replace it\."):
        second.save(path)
    np.testing.assert_array_equal(blockals.ALS.load(path).user_factors_, first.user_factors_)
    second.save(path, overwrite=True)
    loaded = blockals.ALS.load(path)
    assert loaded.rank == 2 and loaded.biases
    np.testing.assert_array_equal(loaded.user_factors_, second.user_factors_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]  # no staged copy or old model left beside it


def test_a_failing_save_leaves_the_old_model_loadable(tmp_path):
    path = tmp_path / "m.zarr"
    made_model("explicit").save(path)
    broken = made_model("biased")
    broken.history_ = [{"iteration": 1, "loss": object()}]  # not JSON: fails after every array is written
    with pytest.raises(TypeError, match="not JSON serializable"):
        broken.save(path, overwrite=True)
    loaded = blockals.ALS.load(path)
    assert not loaded.biases and loaded.history_[0]["loss"] == 1.5
    np.testing.assert_array_equal(loaded.user_factors_, made_model("explicit").user_factors_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]


def test_a_symlinked_model_path_is_replaced_at_its_target(tmp_path):
    real, link = tmp_path / "m-v1.zarr", tmp_path / "m.zarr"
    made_model("explicit").save(real)
    link.symlink_to(real)
    made_model("biased", rank=2).save(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real
    for path in (link, real):
        loaded = blockals.ALS.load(path)
        assert loaded.rank == 2 and loaded.biases
        np.testing.assert_array_equal(loaded.user_factors_, made_model("biased", rank=2).user_factors_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-v1.zarr", "m.zarr"]


def test_a_symlink_and_its_target_share_one_lease(tmp_path):
    import threading

    from blockals.errors import LeaseError
    from blockals.lock import Lease

    real, link = tmp_path / "m-v1.zarr", tmp_path / "m.zarr"
    made_model("explicit").save(real)
    link.symlink_to(real)
    holding, finished = threading.Event(), threading.Event()

    def hold():
        with Lease(str(link), "model"):
            holding.set()
            finished.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LeaseError, match=r"m-v1\.zarr is being written by another process"):
            made_model("biased").save(real, overwrite=True)
    finally:
        finished.set()
        holder.join()
    assert not blockals.ALS.load(link).biases


def test_a_model_path_overlapping_its_ratings_store_is_refused(tmp_path):
    model = made_model("explicit")
    model.store_path_ = str(tmp_path / "r.zarr")
    for path, relation in ((tmp_path / "r.zarr", "is"), (tmp_path / "r.zarr" / "m.zarr", "lies inside"),
                           (tmp_path, "contains")):
        with pytest.raises(blockals.InputError, match=rf"the model path .* {relation} its ratings store .*r\.zarr;"):
            model.save(path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_save_left_is_cleared_or_put_back(tmp_path):
    path = tmp_path / "m.zarr"
    made_model("explicit").save(path)
    # Killed while staging: the staged copy is removed by the next save.
    (tmp_path / ".m.zarr.save-0123456789ab").mkdir()
    (tmp_path / ".m.zarr.save-0123456789ab" / "zarr.json").write_text("{}")
    made_model("biased").save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]
    # Killed between the swap's renames: the old model is put back, and is still refused
    # without overwrite.
    path.rename(tmp_path / ".m.zarr.old-0123456789ab")
    with pytest.raises(blockals.InputError, match=r"already holds a complete model"):
        made_model("explicit").save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]
    assert blockals.ALS.load(path).biases


def test_the_cli_refuses_a_model_inside_its_ratings_store_before_training(tmp_path, capsys):
    frame = pd.DataFrame({"user": [1, 1, 2, 3], "item": [1, 2, 2, 3], "rating": [1.0, 2.0, 3.0, 4.0]})
    blockals.ingest(frame, tmp_path / "r.zarr")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["train", str(tmp_path / "r.zarr"), str(tmp_path / "r.zarr" / "m.zarr"), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the model path" in err and "lies inside the ratings store" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# Unicode, numeric-looking and look-alike ids: "007", "7" and "7.0" are three users, kept as written.
STRING_USERS = ["007", "7", "7.0", "ä", "naïve user", "𝔘𝔫𝔦", "-1", "1e3"]
STRING_ITEMS = ["x", "007", "ü", "Ω", "0", "item 5"]


def test_string_ids_survive_every_round_trip(tmp_path, capsys):
    """CSV -> ingest -> train -> save -> load -> save over itself -> recommend_all (CLI) -> read back."""
    rng = np.random.default_rng(3)
    pairs = [(u, i) for u in STRING_USERS for i in STRING_ITEMS if rng.random() < 0.6]
    frame = pd.DataFrame(pairs, columns=["user", "item"]).assign(rating=rng.integers(1, 6, len(pairs)).astype(float))
    assert set(frame["user"]) == set(STRING_USERS) and set(frame["item"]) == set(STRING_ITEMS)
    frame.to_csv(tmp_path / "r.csv", index=False, encoding="utf-8")
    store = blockals.ingest(tmp_path / "r.csv", tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    assert sorted(store.user_ids) == sorted(STRING_USERS) and sorted(store.item_ids) == sorted(STRING_ITEMS)
    model = blockals.ALS(rank=3, max_iter=2, seed=1).fit(store, cluster_client(2))
    path = tmp_path / "m.zarr"
    model.save(path)
    loaded = blockals.ALS.load(path)
    loaded.save(path, overwrite=True)  # over the path it was loaded from
    again = blockals.ALS.load(path)
    for name in ("user_ids_", "item_ids_", "user_factors_", "item_factors_"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name))
    assert all(type(x) is str for x in again.user_ids_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "r.csv", "r.zarr"]

    recs = tmp_path / "recs.zarr"
    capsys.readouterr()
    assert main(["recommend", str(path), "--output", str(recs), "--n", "2",
                 "--scheduler", cluster_client(2).scheduler.address]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[-1] == f"top 2 items for every user written to {recs}"
    got = read_recommendations(recs)
    # Brute force from the CSV's pairs and the saved factors: the best two items each user did not rate.
    users, items = list(again.user_ids_), list(again.item_ids_)
    scores = again.user_factors_.astype(np.float64) @ again.item_factors_.astype(np.float64).T
    for user, i in pairs:
        scores[users.index(user), items.index(i)] = -np.inf
    expected = {u: [items[j] for j in np.argsort(-scores[users.index(u)], kind="stable")[:2]
                    if np.isfinite(scores[users.index(u), j])] for u in STRING_USERS}
    assert {u: list(g["item"]) for u, g in got.groupby("user")} == {u: v for u, v in expected.items() if v}

    assert main(["recommend", str(path), "--users", "007", "7.0", "--n", "1", "--include-seen"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]  # below the header
    assert rows == ["007", "7.0"]
