"""Reading an uploaded image from a multipart form, under the server's upload limit."""

from __future__ import annotations

from werkzeug.datastructures import FileStorage

import catalog
from webapp.errors import ApiError, upload_too_large


def one_upload(uploads: list[FileStorage], max_upload_bytes: int) -> bytes:
    """The bytes of the one file in the form field ``image`` (given as its ``getlist``); 400 when there is none
    or several, 413 when it is over ``max_upload_bytes``."""
    if not uploads:
        raise ApiError(400, "missing file field 'image' (send the image as multipart/form-data)")
    if len(uploads) > 1:
        raise ApiError(400, f"one image per request: the file field 'image' holds {len(uploads)} files")
    return read_limited(uploads[0], max_upload_bytes)


def read_limited(upload: FileStorage, max_upload_bytes: int, which: str = "") -> bytes:
    """The bytes of ``upload``, read no further than one byte over ``max_upload_bytes``; 413 when it is over,
    naming the upload as ``which`` says (e.g. " (image 2 of 3 ('b.png'))")."""
    data = upload.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise ApiError(413, upload_too_large(max_upload_bytes) + which)
    return data


def unreadable_upload(error: catalog.ImageLoadError) -> ApiError:
    """The 400 of an uploaded file that does not decode as an image."""
    return ApiError(400, f"cannot read the uploaded image: {error.reason}")
