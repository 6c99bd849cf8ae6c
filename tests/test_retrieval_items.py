"""ItemTable: the compact items.csv rows behave exactly like the list of GalleryItem they replace."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.items import GalleryItem, GalleryMismatchError, ItemTable, read_items, write_items

ITEMS = [
    GalleryItem(0, "photos/a.jpg", "cat", "north"),
    GalleryItem(1, 'photos/with, comma and "quotes".jpg', "dog", "south"),
    GalleryItem(2, "фото/кошка.png", "cat", "north"),
    GalleryItem(3, "photos/b.jpg", "bird", "east"),
]


@pytest.mark.parametrize("chains", [True, False])
def test_items_csv_round_trip(tmp_path, chains):
    items = ITEMS if chains else [GalleryItem(i.id, i.path, i.label) for i in ITEMS]
    write_items(tmp_path / "items.csv", items)
    table = read_items(tmp_path / "items.csv")
    assert isinstance(table, ItemTable) and len(table) == 4
    assert table == items and list(table) == items and table[1] == items[1]
    assert table[-1] == items[-1] and table[1:3] == items[1:3] and table[::-2] == items[::-2]
    with pytest.raises(IndexError):
        table[4]
    with pytest.raises(IndexError):
        table[-5]
    assert table.label_array().tolist() == [item.label for item in items]
    expected_chains = [item.chain for item in items] if chains else None
    assert (table.chain_array().tolist() if chains else table.chain_array()) == expected_chains
    assert ItemTable.from_items(items) == table


def test_chain_array_needs_every_row_to_have_one():
    mixed = [GalleryItem(0, "a", "x", None), GalleryItem(1, "b", "y", "c1"), GalleryItem(2, "c", "y", None)]
    table = ItemTable.from_items(mixed)
    assert list(table) == mixed and table.chain_array() is None
    assert ItemTable.from_items([]).chain_array() is None and len(ItemTable.from_items([])) == 0


def test_ids_must_ascend_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="row 2 has id 5"):
        ItemTable.from_items([GalleryItem(0, "a", "x"), GalleryItem(7, "c", "x"), GalleryItem(5, "b", "y")])
    with pytest.raises(ValueError, match="row 0 has id -1"):
        ItemTable.from_items([GalleryItem(-1, "a", "x")])
    for bad in ("0,a,x\n0,b,y", "3,a,x\n2,b,y", "0,a,x\n+2,b,y", "0,a,x\n2,b"):
        (tmp_path / "items.csv").write_text(f"id,path,label\n{bad}\n")
        with pytest.raises(GalleryMismatchError, match="line 3 must have 3 fields starting with an id above"):
            read_items(tmp_path / "items.csv")
    (tmp_path / "items.csv").write_text("id,file,label\n")
    with pytest.raises(GalleryMismatchError, match="header must be id,path,label"):
        read_items(tmp_path / "items.csv")


def test_ids_with_gaps_are_found_by_id_against_a_dict(tmp_path):
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(10_000, 700, replace=False))
    items = [GalleryItem(int(i), f"p/{i}.jpg", f"c{i % 9}") for i in ids]
    write_items(tmp_path / "items.csv", items)
    table = read_items(tmp_path / "items.csv")
    assert not table.dense and ItemTable.from_items([GalleryItem(i, "p", "c") for i in range(3)]).dense
    by_id = {item.id: row for row, item in enumerate(items)}
    probes = rng.integers(-5, 10_010, 3000)
    assert table.rows_of(probes).tolist() == [by_id.get(int(p), -1) for p in probes]
    assert all(table[table.row_of(int(i))] == items[by_id[int(i)]] for i in ids[::50])
    assert table.row_of(2**70) is None and table.row_of(-1) is None


def test_a_hundred_thousand_rows_cost_their_paths_plus_24_bytes_each(tmp_path):
    rng = np.random.default_rng(0)
    items = [
        GalleryItem(i, f"hotels/train/{i % 92}/{rng.integers(10**9)}.jpg", f"hotel{i // 11}", f"c{i % 92}")
        for i in range(100_000)
    ]
    write_items(tmp_path / "items.csv", items)
    table = read_items(tmp_path / "items.csv")
    path_bytes = sum(len(item.path.encode()) for item in items)
    assert table.nbytes() == path_bytes + 24 * len(items)  # id 8, end offset 8, label code 4, chain code 4
    picks = rng.integers(0, len(items), 500)
    assert [table[int(i)] for i in picks] == [items[int(i)] for i in picks]
    assert np.array_equal(table.label_array(), np.array([item.label for item in items]))
