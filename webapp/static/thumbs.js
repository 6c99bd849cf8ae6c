// Evaluation browser: keep tiny gallery images (e.g. 28 px Fashion-MNIST) crisp when their thumbnails scale them up.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const image of document.querySelectorAll("img.thumb")) {
    const sharpen = () => image.classList.toggle("pixelated", image.naturalWidth > 0 && image.naturalWidth < 96);
    if (image.complete) sharpen();
    else image.addEventListener("load", sharpen);
  }
});
