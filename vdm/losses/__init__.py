"""Training objectives and likelihood bounds for diffusion models (pure functions).

Discrete time (Ho et al. 2020; Nichol & Dhariwal 2021), paper indexing t = 1..T:

  -ELBO(x_0) = L_T + sum_{t=2}^T L_{t-1} + L_0                      (Ho et al. eq. 5)
  L_T      = KL(q(x_T | x_0) || N(0, I))                              the prior term
  L_{t-1}  = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  t >= 2    a diffusion term
  L_0      = -log p(x_0 | x_1)                                        the decoder

``vlb_term(..., t)`` returns L_{t-1} for t >= 2 and L_0 for t = 1, so
``sum_{t=1}^T vlb_term(t) + prior_kl`` is the whole bound.

Continuous time (Kingma et al. 2021, "Variational Diffusion Models"): the
diffusion loss eq. 17 and its T-step form eq. 15, with the prior term and the
VDM categorical decoder for 8-bit data.

Units: every likelihood quantity is in nats per example (summed over the data
dimensions) unless a name says bits per dimension. The model function is
``model_fn(x_t, t) -> output`` with ``t`` of shape [B] (integer 1..T for the
discrete losses, float in [0, 1] for ``vdm_loss``); close over parameters and
class labels before passing it in.

Layout: ``likelihoods`` (units, KL, prior term, decoders), ``simple`` (regression
losses and weightings), ``discrete`` (the T-step bound and training loss) and
``continuous`` (the VDM loss and the regression losses at sampled levels).
"""

from vdm.losses.likelihoods import (
    BIN_WIDTH_8BIT, DECODERS, VDM_DECODERS, bits_per_dim, dequantized_nats,
    discretized_gaussian_log_likelihood, gaussian_kl, gaussian_log_likelihood, prior_kl,
    vdm_categorical_decoder_log_likelihood)
from vdm.losses.simple import (
    LOSS_TYPES, WEIGHTINGS, elbo_log_weight, simple_loss)
from vdm.losses.discrete import (
    LOSS_KINDS, LossHistory, discrete_elbo, discrete_elbo_mc, discrete_loss, loss_history_init,
    loss_history_probs, loss_history_sample, loss_history_update, vlb_term)
from vdm.losses.continuous import (
    SCHEDULE_GRADIENTS, T_CLIP, T_SAMPLINGS, T_SAMPLING_DEFAULTS, clipped_time, continuous_simple_loss,
    sample_times, vdm_elbo_exact, vdm_loss)
