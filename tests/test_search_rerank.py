"""Re-ranking as an option of search: the API's ``rerank`` field and ``sct search --rerank`` answer what
``retrieval.rerank.rerank_search`` gives for the same query (whose methods test_retrieval_rerank checks against
plain implementations), and refuse an unknown method or a filtered search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalog import decode_rgb, load_rgb
from retrieval.gallery import Gallery
from retrieval.rerank import METHODS, rerank_search
from sct.cli import main
from tests.test_webapp_api import png_bytes, post_search, served  # noqa: F401 (the fixture)


@pytest.mark.parametrize("method", METHODS)
def test_the_api_re_ranks_as_rerank_search_does(served, method):  # noqa: F811
    data = png_bytes(color=(60, 180, 70), seed=4)
    response = post_search(served["client"], data, k="5", rerank=method)
    assert response.status_code == 200, response.get_json()
    gallery = Gallery.load(served["root"] / "index_data" / "colors")
    query = served["embedder"].embed_images([decode_rgb(data, min_side=gallery.embedder.preprocessing.decode_side)])
    scores, ids = rerank_search(gallery, query, 5, method)
    results = response.get_json()["results"]
    assert [r["id"] for r in results] == [int(i) for i in ids[0] if i >= 0]
    np.testing.assert_allclose([r["score"] for r in results], scores[0][ids[0] >= 0], atol=1e-5)
    more = served["client"].post("/api/search", data={"item": "2", "k": "3", "rerank": method})
    assert more.status_code == 200 and 2 not in [r["id"] for r in more.get_json()["results"]]


def test_the_api_refuses_an_unknown_method_and_a_filtered_re_ranking(served):  # noqa: F811
    client = served["client"]
    response = post_search(client, png_bytes(), rerank="fancy")
    assert (
        response.status_code == 400
        and "rerank must be one of none, k-reciprocal, qe, dba" in response.get_json()["error"]
    )
    response = post_search(client, png_bytes(), rerank="qe", label="red")
    assert response.status_code == 400 and "either filtered or re-ranked" in response.get_json()["error"]
    assert post_search(client, png_bytes(), rerank="none", label="red").status_code == 200


def test_sct_search_re_ranks_and_refuses_a_filter_with_it(served, tmp_path, capsys):  # noqa: F811
    gallery_dir = served["root"] / "index_data" / "colors"
    query_path = served["paths"][4]
    output = tmp_path / "results.jsonl"
    assert main(["search", "--index", str(gallery_dir), str(query_path), "--k", "4", "--rerank", "qe",
                 "--output", str(output)]) == 0  # fmt: skip
    gallery = Gallery.load(gallery_dir)
    query = gallery.embedder.embed_images([load_rgb(query_path, min_side=gallery.embedder.preprocessing.decode_side)])
    _, ids = rerank_search(gallery, query, 4, "qe")
    (line,) = output.read_text().splitlines()
    assert [hit["id"] for hit in json.loads(line)["results"]] == ids[0].tolist()
    capsys.readouterr()
    assert main(["search", "--index", str(gallery_dir), str(query_path), "--rerank", "qe", "--label", "red"]) == 2
    assert "either filtered or re-ranked" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--index", str(gallery_dir), str(query_path), "--rerank", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
