"""Flow matching / rectified flow on the embedded 8x8 digits (Lipman et al. 2023; Liu et al. 2023).

    python scripts/train.py --config=configs/digits_flow.py --workdir=runs/digits_flow

The default digits run (configs/digits.py: the 164k-parameter UNet, batch 64,
3,000 steps) with the path x_t = (1 - t) x_0 + t eps (the "flow" schedule,
log-SNR 2 log((1 - t)/t), which reaches SNR 0 at t = 1), the velocity target
u = eps - x_0 ("flow" parameterization), the conditional flow-matching loss at
logit-normal t (Esser et al. 2024: t = sigmoid(n), n ~ N(0, 1)), and Heun on the
uniform t grid from t = 1 (20 steps, 39 network evaluations). The network sees
t. The VDM -ELBO of eval needs finite log-SNR ends, so eval_bpd is NaN here.
Expected: see docs/results.md (about 10 minutes on a 2-core CPU).
"""
from vdm import config as config_lib


def get_config():
    config = config_lib.defaults()
    config.diffusion.update(dict(time="continuous", schedule="flow", T=0, parameterization="flow",
                                 variance="fixed_small", time_input="t"))
    config.loss.update(dict(name="simple", t_sampling="logit_normal", t_loc=0.0, t_scale=1.0))
    config.sample.update(dict(sampler="flow", num_steps=20, spacing="linspace", options={"method": "heun"}))
    return config
