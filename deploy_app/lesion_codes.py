# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The one mapping from LCA-DB class names to coded concepts used in the SR, checked when imported.

SNOMED CT identifiers were looked up in public terminology material (not guessed); where a source is
a single one it is said so, so that a terminology reviewer knows which lines to double-check:

- ``93469006`` Hemangioma of liver: index code of the Open Imaging Finding Models entry
  ``liver_hemangioma.fm`` (openimagingdata findings catalogue, SNOMEDCT:93469006 "Hemangioma of liver").
  Single source.
- ``312104005`` Cholangiocarcinoma of biliary tract: OHDSI/OMOP vocabulary row (concept 4208660, SNOMED,
  Disorder, valid 2002-01-31..2099-12-31) onto which ICD-O-3 "combined hepatocellular carcinoma and
  cholangiocarcinoma of liver" maps. No pre-coordinated *intrahepatic* cholangiocarcinoma disorder concept
  could be verified with the sources at hand, so the class is coded by this parent concept; the
  intrahepatic location is carried by the group's finding site (liver).
- ``27916005`` Abscess of liver: NCBI MedGen "Liver abscess" (SNOMED CT: Abscess of liver (27916005));
  also in a published radiology indication value-set expansion ("Abscess of liver (disorder)").
- ``94381002`` Secondary malignant neoplasm of liver: same value-set expansion, where the current fully
  specified name is "Metastatic malignant neoplasm to liver (disorder)"; a Swiss FHIR example codes
  liver metastasis with the same identifier and this display.
- ``85057007`` Cyst of liver: a terminology database audit comparing concept rows with the SNOMED CT
  RF2 snapshot ("Cyst of liver (disorder)"); also used by a liver-tumour registry FHIR converter.
- ``278527001`` Focal nodular hyperplasia of liver: the same liver-tumour registry FHIR converter.
  Single source.
- ``109841003`` Liver cell carcinoma (the disorder concept of hepatocellular carcinoma): Swiss CH EKM
  SNOMED CT language supplement ("Liver cell carcinoma (disorder)") and the OHDSI/OMOP vocabulary.

(Identifiers seen elsewhere for some of these classes, e.g. 235866006 for "Cyst of liver", are wrong:
235866006 is "Acute hepatitis C (disorder)" in the Swiss supplement above.)

The predicted class is a qualitative evaluation named ``439401001`` "Diagnosis" (SNOMED CT observable entity;
UMLS C0011900, and the code of the "Diagnosis" condition category in HL7 FHIR examples), so that it is not
confused with the group's finding type (DCM 121071 "Finding" = Lesion).

The per-class probabilities are NUM items whose concept names are local codes of the private coding
scheme ``99LCADB`` ("Probability of <class>"): no standard concept says "probability of focal nodular
hyperplasia". Their code value carries the SNOMED CT identifier of the class, so a reader can map back.

Also local (no standard concept fits): the low-margin flag (the predicted class leads the next one by less than
:data:`LOW_MARGIN_PERCENT` percentage points), the location of a lesion's region in words, the network attention,
and the research-use disclaimer. Every object that uses a ``99LCADB`` code declares the scheme
(:func:`local_coding_scheme`).
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from .domain import MANUFACTURER

__all__ = [
    "ATTENTION_CATEGORY",
    "ATTENTION_REGION",
    "ATTENTION_TYPE",
    "CLASSIFICATION_MARGIN",
    "COMMENT",
    "DIAGNOSIS",
    "DISCLAIMER",
    "IMPRESSION",
    "LESION_CODES",
    "LOCAL_SCHEME_DESIGNATOR",
    "LOCAL_SCHEME_NAME",
    "LOW_MARGIN",
    "LOW_MARGIN_PERCENT",
    "NO_UNITS",
    "PERCENT",
    "QUALITATIVE_EVALUATIONS",
    "REGION_LOCATION",
    "SHORT_NAMES",
    "class_for_code",
    "local_coding_scheme",
    "probability_code",
    "validate_codes",
]

#: Class name (as ``LESION_CLASSES`` and the bundle metadata's ``channel_def`` spell it) -> SNOMED CT code.
LESION_CODES: Mapping[str, Code] = {
    "hepatic_hemangioma": Code("93469006", "SCT", "Hemangioma of liver"),
    "intrahepatic_cholangiocarcinoma": Code("312104005", "SCT", "Cholangiocarcinoma of biliary tract"),
    "hepatic_abscess": Code("27916005", "SCT", "Abscess of liver"),
    "hepatic_metastasis": Code("94381002", "SCT", "Secondary malignant neoplasm of liver"),
    "hepatic_cyst": Code("85057007", "SCT", "Cyst of liver"),
    "focal_nodular_hyperplasia": Code("278527001", "SCT", "Focal nodular hyperplasia of liver"),
    "hepatocellular_carcinoma": Code("109841003", "SCT", "Liver cell carcinoma"),
}

#: Class name -> the short name radiologists use, for labels and the impression (a viewer's measurement list shows two
#: lines of a label; "Focal nodular hyperplasia of liver 24.78 %" does not fit). The coded meaning stays in the SR.
SHORT_NAMES: Mapping[str, str] = {
    "hepatic_hemangioma": "hemangioma",
    "intrahepatic_cholangiocarcinoma": "ICC",
    "hepatic_abscess": "abscess",
    "hepatic_metastasis": "metastasis",
    "hepatic_cyst": "cyst",
    "focal_nodular_hyperplasia": "FNH",
    "hepatocellular_carcinoma": "HCC",
}

#: Concept name of the predicted class (see the module docstring).
DIAGNOSIS = Code("439401001", "SCT", "Diagnosis")

#: Private coding scheme of the probability concept names (see the module docstring).
LOCAL_SCHEME_DESIGNATOR = "99LCADB"
LOCAL_SCHEME_NAME = "LCA-DB deploy app local codes"

#: UCUM "no units" (highdicom ``AlgorithmIdentification`` and TID 300 convention).
NO_UNITS = Code("1", "UCUM", "no units")
#: UCUM percent: the unit of the probabilities in the SR (a viewer prints "87.31 %", clearer than "0.8731 1").
PERCENT = Code("%", "UCUM", "percent")

#: The network's attention map (a model explanation, not an anatomical finding): local codes, as no standard concept
#: names a saliency map. The attention SEG's segmented property category and type.
ATTENTION_CATEGORY = Code("EXPLANATION", LOCAL_SCHEME_DESIGNATOR, "Model explanation")
ATTENTION_TYPE = Code("ATTENTION", LOCAL_SCHEME_DESIGNATOR, "Network attention map")

#: TEXT of a lesion group that web viewers take as the measurement's label: OHIF 3.13's SR viewport lists every
#: Comment first among a TID 1501 group's labels, and the tracked measurement's label is the group's first Comment
#: (see deploy_app/operators/sr_writer_operator.py for the files that do it).
COMMENT = Code("121106", "DCM", "Comment")
#: TID 1500 row 12: the report-level qualitative evaluations, holding the impression and the disclaimer.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
IMPRESSION = Code("121073", "DCM", "Impression")
DISCLAIMER = Code("DISCLAIMER", LOCAL_SCHEME_DESIGNATOR, "Disclaimer")

#: A lesion whose predicted class leads the next one by less than this many percentage points gets the low-margin
#: flag (SR qualitative evaluation, impression, summary page). 10 points: the issue that asked for the flag cites a
#: lesion coded as metastasis at 36 % against 32 % and 29 %; a 7-class softmax that close to uniform is a guess.
LOW_MARGIN_PERCENT = 10.0
CLASSIFICATION_MARGIN = Code("MARGIN", LOCAL_SCHEME_DESIGNATOR, "Classification margin")
LOW_MARGIN = Code(
    "LOW-MARGIN", LOCAL_SCHEME_DESIGNATOR, f"Low: next class within {LOW_MARGIN_PERCENT:g} percentage points"
)
#: TEXT of a lesion group: the series, image and slice its region is drawn on, in words.
REGION_LOCATION = Code("REGION-LOCATION", LOCAL_SCHEME_DESIGNATOR, "Region location")
#: TEXT of a lesion group: where the network's attention for the lesion is (the attention SEG's segment).
ATTENTION_REGION = Code("ATTENTION-REGION", LOCAL_SCHEME_DESIGNATOR, "Network attention")

_MAX_MEANING = 64  # Code Meaning (0008,0104) is LO: at most 64 characters
_MAX_VALUE = 16  # Code Value (0008,0100) is SH: at most 16 characters


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item declaring ``99LCADB``, for every object that uses its codes."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME_DESIGNATOR, name=LOCAL_SCHEME_NAME, responsible_organization=MANUFACTURER
    )


def probability_code(class_name: str) -> Code:
    """Concept name of the NUM item holding the probability of ``class_name``.

    Raises:
        KeyError: when ``class_name`` has no entry in :data:`LESION_CODES`.
    """
    finding = LESION_CODES[class_name]
    meaning = finding.meaning[0].lower() + finding.meaning[1:]
    return Code(f"P-{finding.value}", LOCAL_SCHEME_DESIGNATOR, f"Probability of {meaning}")


def class_for_code(value: str, scheme_designator: str) -> str:
    """Class name whose finding code (or probability code) is ``(value, scheme_designator)``.

    Raises:
        KeyError: when no class has this code.
    """
    for name, code in LESION_CODES.items():
        probability = probability_code(name)
        if (value, scheme_designator) in {
            (code.value, code.scheme_designator),
            (probability.value, probability.scheme_designator),
        }:
            return name
    raise KeyError(f"no LCA-DB class has the code ({value}, {scheme_designator}).")


def validate_codes(class_names: tuple[str, ...] | list[str]) -> None:
    """Check that every class in ``class_names`` has a code and that all codes fit their DICOM VRs.

    Raises:
        ValueError: naming the class without a code, a duplicate code, or a value/meaning that is too long.
    """
    missing = [name for name in class_names if name not in LESION_CODES]
    if missing:
        raise ValueError(f"lesion classes without a SNOMED CT code in deploy_app/lesion_codes.py: {missing}.")
    unnamed = [name for name in class_names if name not in SHORT_NAMES]
    if unnamed:
        raise ValueError(f"lesion classes without a short name in deploy_app/lesion_codes.py: {unnamed}.")
    seen: dict[str, str] = {}
    for name, code in LESION_CODES.items():
        for concept in (code, probability_code(name)):
            if len(concept.meaning) > _MAX_MEANING:
                raise ValueError(
                    f"code meaning of class {name!r} is {len(concept.meaning)} characters, at most {_MAX_MEANING} "
                    f"are allowed: {concept.meaning!r}."
                )
            if len(concept.value) > _MAX_VALUE:
                raise ValueError(f"code value of class {name!r} is longer than {_MAX_VALUE}: {concept.value!r}.")
        if code.value in seen:
            raise ValueError(f"classes {seen[code.value]!r} and {name!r} share the code {code.value}.")
        seen[code.value] = name


def _validate_against_constants() -> None:
    try:  # the bundle's class list, when its package is importable (it is in tests and in the MAP)
        from scripts.constants import LESION_CLASSES  # type: ignore[import-not-found]
    except ImportError:
        validate_codes(tuple(LESION_CODES))
        return
    validate_codes(LESION_CLASSES)


_validate_against_constants()
