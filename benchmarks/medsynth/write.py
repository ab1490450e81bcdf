"""Writing images into the data set layout ``DIR/<modality>/<source>/<files>``.

``source`` is ``real`` or the generator's name, the layout ``detector.dataset``
reads (any folder name other than ``real`` is a fake). Every image, real or fake,
goes through the same code path from a display image in [0, 1], so file format,
bit depth and metadata never differ between the classes: only pixels do.

* PNG: 8-bit greyscale by default (what the generators were trained on), or
  16-bit greyscale (``bit_depth=16``).
* DICOM: a minimal but valid image of the modality's IOD (CT, MR, DX, CR, US, or
  Secondary Capture), MONOCHROME2, with deterministic UIDs (UUID-derived under
  pydicom's root from the seed, modality, source and index) and fixed dates, so
  files are bit-identical across runs. Stored values are the display image
  quantised to 12 bits (8 for US); for CT the Rescale Slope/Intercept map them
  back to HU through the image's display window, and the window is written as
  the VOI window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from .common import Window
from .ct import DISPLAY_WINDOW as CT_DISPLAY_WINDOW

UID_PREFIX = "1.2.826.0.1.3680043.8.498."     # pydicom's registered root
SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
}
FORMATS = ("png", "dcm")
NOMINAL_SPACING_MM = {"CT": 3.0, "MR": 1.8, "DX": 0.3, "CR": 0.3}


def quantise(image: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] float -> unsigned integers with ``bits`` bits (round half to even, clipped)."""
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains non-finite values")
    top = (1 << bits) - 1
    q = np.rint(np.clip(image, 0.0, 1.0) * top)
    return q.astype(np.uint8 if bits <= 8 else np.uint16)


def write_png(path: Path, image: np.ndarray, bit_depth: int = 8) -> Path:
    if bit_depth not in (8, 16):
        raise ValueError(f"PNG bit depth must be 8 or 16, got {bit_depth}")
    path.parent.mkdir(parents=True, exist_ok=True)
    q = quantise(image, bit_depth)
    img = Image.fromarray(q, mode="L") if bit_depth == 8 else Image.fromarray(q.astype(np.uint16), mode="I;16")
    img.save(path, format="PNG")
    return path


def _uid(*parts: object) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def build_dicom(image: np.ndarray, modality: str, *, key: tuple[object, ...], window: Window | None = None) -> Dataset:
    """A DICOM dataset holding ``image`` (display values in [0, 1]); ``key`` makes the UIDs unique."""
    sop_class = SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    bits = 8 if modality == "US" else 12
    q = quantise(image, bits)
    study, series, sop = _uid("study", *key), _uid("series", *key), _uid("sop", *key)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = _uid("for", *key)
    ds.Modality = modality
    ds.PatientName = "MedSynth^Benchmark"
    ds.PatientID = "MEDSYNTH-" + sop.rsplit(".", 1)[-1][-10:]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "DSKI Node medsynth"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    if modality not in ("DX", "CR"):
        ds.Laterality = ""
    ds.PositionReferenceIndicator = ""
    ds.PatientOrientation = ""
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = q.shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if modality == "CT":
        window = window or CT_DISPLAY_WINDOW
        top = (1 << bits) - 1
        ds.RescaleSlope = f"{window.width / top:.6g}"
        ds.RescaleIntercept = f"{window.center - window.width / 2.0:.6g}"
        ds.RescaleType = "HU"
        ds.WindowCenter = f"{window.center:.6g}"
        ds.WindowWidth = f"{window.width:.6g}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
    elif bits > 8:
        ds.WindowCenter = f"{((1 << bits) - 1) / 2.0:.6g}"
        ds.WindowWidth = f"{1 << bits}"
    if modality in ("CT", "MR"):
        # Image plane: nominal geometry, identical for every image of the modality (real or fake).
        ds.PatientPosition = "HFS"
        ds.PixelSpacing = [NOMINAL_SPACING_MM[modality]] * 2
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-q.shape[1] * NOMINAL_SPACING_MM[modality] / 2,
                                   -q.shape[0] * NOMINAL_SPACING_MM[modality] / 2, 0]
        ds.SliceThickness = "5" if modality == "CT" else "4"
        ds.AcquisitionNumber = 1
    if modality in ("DX", "CR"):
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.AnatomicRegionSequence = []
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.AcquisitionContextSequence = []
        ds.DetectorType = "SCINTILLATOR" if modality == "DX" else "STORAGE"
        ds.ImagerPixelSpacing = [NOMINAL_SPACING_MM[modality]] * 2
        ds.PatientOrientation = ["L", "F"]
    if modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.RepetitionTime = "2000"          # nominal: identical for reals and fakes
        ds.EchoTime = "20"
        ds.EchoTrainLength = 1
    ds.PixelData = q.tobytes()
    return ds


def write_dicom(path: Path, image: np.ndarray, modality: str, *, key: tuple[object, ...],
                window: Window | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    build_dicom(image, modality, key=key, window=window).save_as(path, enforce_file_format=True)
    return path


def write_image(root: Path, modality: str, source: str, name: str, image: np.ndarray, *, fmt: str = "png",
                bit_depth: int = 8, key: tuple[object, ...] = (), window: Window | None = None) -> Path:
    """Write one image to ``root/<modality>/<source>/<name>.<png|dcm>``; returns its path."""
    if image.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D greyscale image, got shape {image.shape}")
    folder = root / modality / source
    if fmt == "png":
        return write_png(folder / f"{name}.png", image, bit_depth)
    if fmt == "dcm":
        return write_dicom(folder / f"{name}.dcm", image, modality, key=key or (modality, source, name), window=window)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
