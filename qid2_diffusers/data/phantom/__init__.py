"""Diffusion MRI phantoms with known truth, in the HCP layout.

There is no HCP data in this project, so these phantoms are what models are
trained and benchmarked on. Two simulators share the acquisition
(:mod:`.scheme`) and the writer (:mod:`.writing`), nothing else:

**The brain phantom** (:func:`make_subject`), drawn from its seed:

- **Anatomy** (:mod:`.anatomy`, MNI-like template millimetres, then scaled,
  rotated and shifted per subject as a head would sit in the scanner): a
  cerebrum, cerebellum and brainstem; a folded cortical ribbon of grey matter
  whose sulci are CSF sheets running perpendicular to the surface; the
  interhemispheric fissure and the tentorium; lateral and third ventricles;
  thalamus, putamen and caudate; a subarachnoid CSF layer, skull (no signal)
  and scalp. :mod:`.geometry` evaluates it on the grid, every boundary
  partial-volumed over one voxel.
- **Fibres**: five bundle families, each a set of tubes around smooth centre
  curves — commissural (corpus callosum with its forceps, and the pontine
  fibres of the middle cerebellar peduncle; left–right), projection
  (corticospinal tract and corona radiata; inferior–superior), dorsal
  association (superior longitudinal fasciculus and arcuate;
  anterior–posterior), ventral association (fronto-occipital and
  longitudinal fasciculi) and the cingulum (an arc over the corpus callosum
  into the temporal lobe). White matter that no bundle reaches carries radial
  fibres (towards the cortex; along the brainstem axis in the brainstem),
  crossed within a few millimetres of the cerebral cortex by U-fibres that run
  along the surface across the nearest sulcus.
  A voxel's fibre direction within a family is the tangent of the nearest
  centre-curve point; where tubes of different families overlap, the voxel
  holds a 2- or 3-way crossing. The three largest populations are kept,
  those below :data:`MIN_FIBRE_FRACTION` dropped, and populations closer
  than :data:`MERGE_ANGLE_DEG` merged, so ``n_fibres`` counts crossings a
  fibre-orientation method could hope to resolve.
- **Signal** (:mod:`.signal`) per voxel: white matter as a sum over its fibre
  populations of an intra-axonal stick and a tortuous extra-axonal zeppelin;
  isotropic grey matter, free-water CSF and scalp; tissue-dependent S0 (T2
  contrast: CSF brightest on b0), a smooth receive-coil bias field, and
  Rician noise of standard deviation ``S0_wm / snr`` (background voxels hold
  pure Rayleigh noise, as a magnitude scanner image does).
- **Domain randomisation** (opt-in, ``randomize=True``, :mod:`.randomize`):
  microstructure, orientation dispersion, contrast, bias, voxel size, SNR,
  smooth partial volume and Gibbs ringing drawn per subject.

The scheme mirrors an HCP shell (:func:`hcp_scheme`): 18 interleaved b0 and
90 uniform directions per shell on a 145×174×145 grid at 1.25 mm (72×87×72 at
2.5 mm) with HCP's affine, whose negative x zoom makes FSL b-vectors equal to
voxel-frame directions; ``bvecs`` and ``peaks`` are both in that frame.

Everything is deterministic per seed: the anatomy comes from
``default_rng([seed, 0])`` (the same at every resolution), the noise of
axial slice ``k`` from ``default_rng([seed, 1, k])`` and the randomisation
from ``default_rng([seed, 2])``, so a ``slab`` subject is exactly the
matching slices of the full one.

**The multi-tensor slab** (:func:`make_multitensor_subject`,
:mod:`.multitensor`): crossing straight and curved bundles and isotropic
regions simulated with dipy's ``multi_tensor``, for evaluation off the
training distribution only.
"""

from .anatomy import FAMILIES, MERGE_ANGLE_DEG, MIN_FIBRE_FRACTION
from .multitensor import make_multitensor_subject
from .randomize import PhantomRandomization, draw_randomization
from .scheme import HCP_CENTRE_MM, HCP_FOV_MM, hcp_scheme, phantom_grid
from .subject import PhantomSubject, make_subject
from .writing import SIMULATORS, load_truth, subject_seed, write_cohort, write_subject

__all__ = [
    "PhantomSubject",
    "PhantomRandomization",
    "hcp_scheme",
    "phantom_grid",
    "make_subject",
    "make_multitensor_subject",
    "draw_randomization",
    "subject_seed",
    "write_subject",
    "write_cohort",
    "load_truth",
    "FAMILIES",
    "MIN_FIBRE_FRACTION",
    "MERGE_ANGLE_DEG",
    "SIMULATORS",
    "HCP_FOV_MM",
    "HCP_CENTRE_MM",
]
