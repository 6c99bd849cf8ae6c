// Search page: choose / drop / paste an image, preview it, POST it to /api/search, show the results grid;
// each result links to its pair view (query and result with their similarity heatmaps) and has a
// "More like this" link, which searches with that gallery item as the query. An item search lives in the
// page's URL (/?item=ID&index=NAME, also the target of the other pages' "More like this" links); the last
// image search is kept in sessionStorage, so that coming back from a pair view shows it again.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("search-form");
  const input = document.getElementById("image-input");
  const dropZone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const hint = document.getElementById("drop-hint");
  const queryCaption = document.getElementById("query-caption");
  const kInput = document.getElementById("k-input");
  const indexSelect = document.getElementById("index-select");
  const button = document.getElementById("search-button");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  const evaluationLink = document.getElementById("evaluation-link");
  const maxBytes = Number(form.dataset.maxBytes);
  const defaultIndex = form.dataset.defaultIndex;
  const storageKey = "sct-last-search";

  let queryFile = null; // the image of the latest image search
  let queryItem = null; // {id, index} while the page shows an item search
  let previewUrl = null;
  let searchNumber = 0; // only the latest search may update the page

  function showStatus(message, isError = false) {
    status.textContent = message;
    status.classList.toggle("error", isError);
  }

  function chooseFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showStatus(`“${file.name}” is not an image.`, true);
      return;
    }
    if (file.size > maxBytes) {
      showStatus(`“${file.name}” is ${(file.size / 1048576).toFixed(1)} MiB; the limit is ${(maxBytes / 1048576).toFixed(0)} MiB.`, true);
      return;
    }
    queryFile = file;
    if (queryItem) {
      queryItem = null;
      history.pushState(null, "", location.pathname); // back returns to the item search
    }
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    showPreview(previewUrl, "");
    button.disabled = false;
    search();
  }

  function showPreview(url, caption) {
    preview.src = url;
    preview.hidden = false;
    queryCaption.textContent = caption;
    queryCaption.hidden = !caption;
    dropZone.classList.add("has-image");
    hint.querySelector("strong").textContent = "Drop another image to search again";
  }

  function clearPreview() {
    preview.removeAttribute("src");
    preview.hidden = true;
    queryCaption.hidden = true;
    dropZone.classList.remove("has-image");
    hint.querySelector("strong").textContent = "Drop an image here";
  }

  // A small copy of the query as a data URL: the object URL of the file dies with the page.
  function thumbnail() {
    if (!preview.naturalWidth) return null;
    const scale = Math.min(1, 320 / Math.max(preview.naturalWidth, preview.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(preview.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(preview.naturalHeight * scale));
    canvas.getContext("2d").drawImage(preview, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/png");
  }

  function remember(payload) {
    const saved = { payload, preview: thumbnail(), k: kInput.value, index: indexSelect ? indexSelect.value : null };
    try {
      sessionStorage.setItem(storageKey, JSON.stringify(saved));
    } catch {
      // storage full or disabled: the search just won't come back after navigating away
    }
  }

  function restore() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(storageKey));
    } catch {
      saved = null;
    }
    if (!saved) {
      clearPreview();
      results.replaceChildren();
      showStatus("");
      return;
    }
    if (saved.preview) showPreview(saved.preview, "");
    kInput.value = saved.k;
    if (indexSelect && saved.index) selectIndex(saved.index);
    renderResults(saved.payload);
  }

  function selectIndex(name) {
    if (!indexSelect || ![...indexSelect.options].some((option) => option.value === name)) return;
    indexSelect.value = name;
    followIndex();
  }

  function followIndex() {
    const url = new URL(evaluationLink.href);
    url.searchParams.set("index", indexSelect.value);
    evaluationLink.href = url.pathname + url.search;
  }

  // The search page's own URL of an item search: what "More like this" links to.
  function itemSearchUrl(id, index) {
    return `${location.pathname}?${new URLSearchParams({ item: String(id), index })}`;
  }

  // Show the search the URL names: an item search, or else the last image search of this tab.
  function followUrl() {
    const params = new URLSearchParams(location.search);
    if (params.has("item")) {
      queryItem = { id: params.get("item"), index: params.get("index") || defaultIndex };
      selectIndex(queryItem.index);
      button.disabled = false;
      search();
    } else {
      queryItem = null;
      button.disabled = !queryFile;
      restore();
    }
  }

  async function search() {
    if (!queryFile && !queryItem) return;
    const k = Number(kInput.value);
    if (!Number.isInteger(k) || k < 1 || k > Number(kInput.max)) {
      showStatus(`K must be a whole number from 1 to ${kInput.max}.`, true);
      return;
    }
    const item = queryItem;
    const body = new FormData();
    if (item) {
      body.append("item", item.id);
      body.append("index", item.index);
    } else {
      body.append("image", queryFile, queryFile.name || "query");
      if (indexSelect) body.append("index", indexSelect.value);
    }
    body.append("k", String(k));

    const number = ++searchNumber;
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    showStatus("Searching…");
    try {
      const response = await fetch(form.action, { method: "POST", body });
      const payload = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
      if (number !== searchNumber) return;
      if (!response.ok) throw new Error(payload.error || `${response.status} ${response.statusText}`);
      if (item) {
        const query = payload.query_item;
        showPreview(query.image_url, `Gallery item #${query.id} · ${query.label}`);
      }
      renderResults(payload);
      if (!item) remember(payload);
    } catch (error) {
      if (number !== searchNumber) return;
      results.replaceChildren();
      if (item) clearPreview();
      else sessionStorage.removeItem(storageKey);
      showStatus(error.message || String(error), true);
    } finally {
      if (number === searchNumber) {
        button.disabled = false;
        form.removeAttribute("aria-busy");
      }
    }
  }

  function describeTimings(t) {
    const stages = Object.entries(t)
      .filter(([stage]) => stage !== "total")
      .map(([stage, ms]) => `${stage} ${ms.toFixed(1)}`);
    return `in ${t.total.toFixed(1)} ms (${stages.join(" · ")} ms)`;
  }

  function renderResults(payload) {
    const like = payload.query_item ? ` like gallery item #${payload.query_item.id}` : "";
    showStatus(
      `${payload.results.length} results from ${payload.index}${like} ${describeTimings(payload.timings_ms)} · ` +
      "click a result for its similarity heatmaps"
    );
    const cards = payload.results.map((result, position) => {
      const hit = document.createElement("div");
      hit.className = "hit";

      const card = document.createElement("a");
      card.className = "result";
      card.href = result.pair_url;
      card.title = "Compare with the query: similarity heatmaps";

      const image = document.createElement("img");
      image.src = result.image_url;
      image.alt = result.label;
      image.loading = "lazy";
      image.decoding = "async";
      image.addEventListener("load", () => {
        // keep tiny images (e.g. 28 px Fashion-MNIST) crisp when scaled up
        if (image.naturalWidth < 96) image.classList.add("pixelated");
      });

      const caption = document.createElement("span");
      caption.className = "caption";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${position + 1}`;
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = result.label;
      label.title = result.label;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = result.score.toFixed(3);
      score.title = "cosine similarity";
      caption.append(label, rank, score);
      card.append(image, caption);

      const more = document.createElement("a");
      more.className = "more-like-this";
      more.href = itemSearchUrl(result.id, payload.index);
      more.textContent = "More like this";
      more.title = `Search with gallery item #${result.id} as the query`;
      more.addEventListener("click", (event) => {
        if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
        event.preventDefault();
        history.pushState(null, "", more.href);
        followUrl();
        window.scrollTo({ top: 0 });
      });

      hit.append(card, more);
      return hit;
    });
    results.replaceChildren(...cards);
  }

  input.addEventListener("change", () => chooseFile(input.files[0]));

  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
  }
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
  // dropping next to the zone should not navigate away from the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) chooseFile(file);
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  if (indexSelect) {
    indexSelect.addEventListener("change", () => {
      followIndex();
      if (queryItem) {
        // an item id names an item of its own gallery only
        const item = queryItem;
        queryItem = null;
        history.pushState(null, "", location.pathname);
        clearPreview();
        results.replaceChildren();
        button.disabled = !queryFile;
        showStatus(`Gallery item #${item.id} belongs to ${item.index}; drop an image to search ${indexSelect.value}.`);
        return;
      }
      search();
    });
  }
  window.addEventListener("popstate", followUrl);
  preview.addEventListener("load", () => preview.classList.toggle("pixelated", preview.naturalWidth < 96));
  followUrl();
});
