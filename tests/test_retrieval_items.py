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


def test_ids_must_be_row_numbers_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="row 1 has id 5"):
        ItemTable.from_items([GalleryItem(0, "a", "x"), GalleryItem(5, "b", "y")])
    (tmp_path / "items.csv").write_text("id,path,label\n0,a,x\n2,b,y\n")
    with pytest.raises(GalleryMismatchError, match="line 3 must have 3 fields starting with id 1"):
        read_items(tmp_path / "items.csv")
    (tmp_path / "items.csv").write_text("id,file,label\n")
    with pytest.raises(GalleryMismatchError, match="header must be id,path,label"):
        read_items(tmp_path / "items.csv")


def test_a_hundred_thousand_rows_cost_their_paths_plus_16_bytes_each(tmp_path):
    rng = np.random.default_rng(0)
    items = [
        GalleryItem(i, f"hotels/train/{i % 92}/{rng.integers(10**9)}.jpg", f"hotel{i // 11}", f"c{i % 92}")
        for i in range(100_000)
    ]
    write_items(tmp_path / "items.csv", items)
    table = read_items(tmp_path / "items.csv")
    path_bytes = sum(len(item.path.encode()) for item in items)
    assert table.nbytes() == path_bytes + 16 * len(items)  # end offset 8, label code 4, chain code 4
    picks = rng.integers(0, len(items), 500)
    assert [table[int(i)] for i in picks] == [items[int(i)] for i in picks]
    assert np.array_equal(table.label_array(), np.array([item.label for item in items]))
