"""Embed images with an exported ONNX model (contract: docs/ARCHITECTURE.md, "ONNX model")."""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image
from tqdm import tqdm

import catalog
from core.cpus import usable_cpus
from core.errors import UserFileNotFoundError, UserValueError
from retrieval.preprocessing import Preprocessing, preprocess, preprocess_batch

INPUT_NAME = "image"
EMBEDDING_OUTPUT = "embedding"
FEATURE_MAP_OUTPUT = "feature_map"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


log = logging.getLogger(__name__)

#: What onnxruntime takes as providers: names, or (name, options) pairs.
Providers = Sequence[str | tuple[str, dict[str, object]]]


def default_providers(device_id: int | None = None) -> list[str | tuple[str, dict[str, object]]]:
    """CUDA (on GPU ``device_id``, else the first) when this onnxruntime build has it, else CPU."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        cuda = "CUDAExecutionProvider" if device_id is None else ("CUDAExecutionProvider", {"device_id": device_id})
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def warn_on_fallback(requested: Providers, actual: Sequence[str], model: str | os.PathLike[str]) -> bool:
    """Log a warning, and return True, when the session does not run on the first provider ``requested``.

    ONNX Runtime lists CUDA as available whenever its build has it, but a session falls back to the CPU with no
    exception when the CUDA or cuDNN libraries it needs fail to load (onnxruntime-gpu is built against one CUDA
    major version); only the session's own provider list shows it."""
    wanted = [provider if isinstance(provider, str) else provider[0] for provider in requested]
    if not wanted or not actual or actual[0] == wanted[0]:
        return False
    log.warning(
        "ONNX Runtime runs %s on %s, not on %s as requested (providers requested: %s; the session has: %s); "
        "check that the CUDA and cuDNN libraries this onnxruntime build needs can be loaded",
        Path(model).name,
        actual[0],
        wanted[0],
        ", ".join(wanted),
        ", ".join(actual),
    )
    return True


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings of the readable images; ``kept_indices`` maps rows back to the input paths."""

    embeddings: np.ndarray  # float32 [K, d]
    kept_indices: np.ndarray  # int64 [K], positions in the input path list
    failures: list[tuple[str, str]]  # (path, reason) of each skipped image


class OnnxEmbedder:
    """An onnxruntime session plus the preprocessing stored in the model's metadata.

    ``threads`` (default: the usable CPUs) is both onnxruntime's intra-op
    thread count and the number of image-decoding threads of ``embed_paths``.
    """

    def __init__(
        self, model_path: str | os.PathLike[str], providers: Providers | None = None, threads: int | None = None
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserFileNotFoundError(f"ONNX model not found: {self.model_path}")
        self.providers = list(providers or default_providers())
        self.threads = threads or usable_cpus()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.model_path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise UserValueError(f"cannot load ONNX model {self.model_path}: {exc}") from exc
        warn_on_fallback(self.providers, self.session.get_providers(), self.model_path)
        self._check_signature()
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.preprocessing = Preprocessing.from_metadata(metadata)
            self.dim = self._embedding_dim(metadata)
        except ValueError as exc:
            raise UserValueError(f"{self.model_path}: {exc}") from None

    @cached_property
    def sha256(self) -> str:
        """sha256 of the model file, the model's identity in gallery manifests."""
        return file_sha256(self.model_path)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit embeddings [N, d] of PIL RGB images, in one model call."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(preprocess_batch(images, self.preprocessing), [EMBEDDING_OUTPUT])[0]

    def embed_with_maps(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings [N, d] and projected feature maps [N, Z, d] (for similarity heatmaps)."""
        return self.embed_pixels_with_maps(preprocess_batch(images, self.preprocessing))

    def embed_pixels_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``embed_with_maps`` of an already preprocessed batch [N, 3, S, S], for callers that keep the pixels."""
        embeddings, maps = self._run(batch, [EMBEDDING_OUTPUT, FEATURE_MAP_OUTPUT])
        return embeddings, maps

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        batch_size: int = 64,
        progress: bool = True,
        workers: int = 1,
    ) -> EmbedResult:
        """Embed image files in batches; unreadable files are skipped and reported, never fatal.

        Decoding and preprocessing run in a thread pool (Pillow releases the
        GIL), and the next batch is prepared while the model runs on this one.
        With ``workers`` > 1 the paths are embedded in that many processes,
        each with its own onnxruntime session (see ``_embed_in_processes``);
        they are spawned, so a script calling this needs the
        ``if __name__ == "__main__":`` guard.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if workers > 1 and len(paths) > 1:
            return self._embed_in_processes(paths, batch_size, progress, workers)
        chunks: list[np.ndarray] = []
        kept: list[int] = []
        failures: list[tuple[str, str]] = []
        with (
            ThreadPoolExecutor(max_workers=self.threads) as pool,
            tqdm(total=len(paths), unit="img", desc="embedding", disable=not progress) as bar,
        ):

            def prepare(start: int) -> list[Future[np.ndarray]]:
                return [pool.submit(self._load_and_preprocess, path) for path in paths[start : start + batch_size]]

            upcoming = prepare(0)
            for start in range(0, len(paths), batch_size):
                current, upcoming = upcoming, prepare(start + batch_size)
                inputs = []
                for index, future in enumerate(current, start=start):
                    try:
                        inputs.append(future.result())
                        kept.append(index)
                    except catalog.ImageLoadError as exc:
                        failures.append((str(paths[index]), exc.reason))
                if inputs:
                    chunks.append(self._run(np.stack(inputs), [EMBEDDING_OUTPUT])[0])
                bar.update(len(current))
                if failures:
                    bar.set_postfix(skipped=len(failures))
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)
        return EmbedResult(embeddings, np.asarray(kept, dtype=np.int64), failures)

    def _embed_in_processes(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int, progress: bool, workers: int
    ) -> EmbedResult:
        """``embed_paths`` over ``workers`` spawned processes, each with usable CPUs / workers threads.

        The paths are cut into consecutive tasks of up to 8 batches (fewer when
        that would leave a worker idle), and the results are put back in path
        order, so the result is the one process's up to float rounding.
        """
        task_size = max(1, min(8 * batch_size, -(-len(paths) // workers)))
        starts = range(0, len(paths), task_size)
        tasks = [list(paths[start : start + task_size]) for start in starts]
        threads = max(1, usable_cpus() // workers)
        results: list[EmbedResult] = []
        with (
            ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(str(self.model_path), self.providers, threads),
            ) as pool,
            tqdm(total=len(paths), unit="img", desc=f"embedding ({workers} processes)", disable=not progress) as bar,
        ):
            for task, result in zip(tasks, pool.map(_embed_in_worker, tasks, itertools.repeat(batch_size))):
                results.append(result)
                bar.update(len(task))
        kept = [result.kept_indices + start for start, result in zip(starts, results)]
        return EmbedResult(
            np.concatenate([result.embeddings for result in results]).astype(np.float32, copy=False),
            np.concatenate(kept).astype(np.int64, copy=False),
            [failure for result in results for failure in result.failures],
        )

    def _load_and_preprocess(self, path: str | os.PathLike[str]) -> np.ndarray:
        return preprocess(catalog.load_rgb(path, min_side=self.preprocessing.decode_side), self.preprocessing)

    def _run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})

    def _check_signature(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = {EMBEDDING_OUTPUT, FEATURE_MAP_OUTPUT} - outputs
        if inputs != [INPUT_NAME] or missing:
            raise UserValueError(
                f"{self.model_path} does not follow the model contract: expected input {INPUT_NAME!r} and outputs "
                f"{EMBEDDING_OUTPUT!r}, {FEATURE_MAP_OUTPUT!r}; it has inputs {inputs} and outputs {sorted(outputs)}"
            )

    def _embedding_dim(self, metadata: dict[str, str]) -> int:
        """``embedding_dim`` from the metadata, cross-checked with the output shape when that is static."""
        if "embedding_dim" not in metadata:
            raise UserValueError("model metadata lacks embedding_dim")
        try:
            dim = int(metadata["embedding_dim"])
        except ValueError:
            text = metadata["embedding_dim"]
            raise UserValueError(f"model metadata embedding_dim must be an integer, got {text!r}") from None
        output = next(o for o in self.session.get_outputs() if o.name == EMBEDDING_OUTPUT)
        graph_dim = output.shape[-1] if output.shape else None
        if isinstance(graph_dim, int) and graph_dim != dim:
            raise UserValueError(f"metadata embedding_dim {dim} disagrees with the embedding output's size {graph_dim}")
        return dim


#: The embedder of a worker process of ``OnnxEmbedder._embed_in_processes``.
_worker_embedder: OnnxEmbedder | None = None


def _start_worker(model_path: str, providers: Providers, threads: int) -> None:
    global _worker_embedder
    _worker_embedder = OnnxEmbedder(model_path, providers=providers, threads=threads)


def _embed_in_worker(paths: list[str | os.PathLike[str]], batch_size: int) -> EmbedResult:
    return _worker_embedder.embed_paths(paths, batch_size=batch_size, progress=False)
