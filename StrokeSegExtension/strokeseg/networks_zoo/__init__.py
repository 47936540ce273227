"""Networks of the five papers in ``shared/seeds``, registered by name for model cards.

Importing this package registers every network (``strokeseg.networks.build`` imports it on first
use), so an exported model runs in the engine and Slicer from its card alone.

=========================== ======= ==========================================================
name                        paper   network
=========================== ======= ==========================================================
strokeseg.DeepMedic         000     two-pathway 3D CNN (normal + 3x down-sampled context)
strokeseg.AsymResUNet       001     asymmetric residual U-Net (75 % / 25 % encoder / decoder)
strokeseg.EDDNet            002     ensemble of 2D DeconvNets (max-unpooling) + refinement
strokeseg.DeconvNet2D       002     one DeconvNet
strokeseg.MuscleNet         002     multi-scale patch classifier of small candidates
strokeseg.EDDMuscle         002     EDD Net then MUSCLE re-evaluation with Bayes fusion
strokeseg.PatchCNN3D        003     25^3 patch CNN in dense, fully convolutional form
strokeseg.CTPGenSeg         004     CTP -> synthetic DWI generator + GroupNorm/maxout segmentator
strokeseg.GNUNet            004     the GroupNorm U-Net both are built from
strokeseg.LSGANDiscriminator 004    least-squares GAN discriminator (training only)
strokeseg.SliceWise         --      runs a 2D network on each z-slice of a 3D input
=========================== ======= ==========================================================
"""

from . import asym_unet, ctp_gan, deepmedic, edd, muscle, patchcnn, slicewise  # noqa: F401  (registration)
