"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"), in two modes.

Every client clips its whole upload (the delta of every segment it uploads this round, taken
together as one vector) to L2 norm C, then

- ``central``: the hub (trusted to aggregate) clips each update again to C after decoding it,
  sums the clipped updates with weight 1 each and adds Gaussian noise of standard deviation
  Z * C to every coordinate of that sum, then divides each segment's noised sum by the number
  of clients that reported that segment.
- ``local``: the client adds the Gaussian noise (std Z * C per coordinate) to its clipped
  delta itself, so the hub never sees an un-noised delta; the hub takes the uniform mean of
  what arrives.

Noise is drawn on the party that adds it from the operating system's cryptographic random
source (`os.urandom`, every draw from fresh bytes: no seed, no pseudo-random generator state),
never from the federation's public seed; rounds and reports record it as ``noise: os-random``.
Such runs are therefore not bit-reproducible. (The Gaussian is sampled in floating point;
Mironov's attack on floating-point Laplace/Gaussian samplers is not defended against.)

Neighbouring federations and sensitivity. Neighbours differ in one client's data replaced by
nothing: its update replaced by zero ("zero-out" adjacency, Kairouz et al. 2021), so the
number of clients reporting each segment is the same in both, and the per-segment
denominators are public. One client's clipped upload has L2 norm <= C, so the vector of all
segment sums moves by at most C: each round is a Gaussian mechanism of noise multiplier Z.
Weights are uniform (a client's sample count would otherwise scale its sensitivity, and
would itself be private); under local DP a client also sends ``num_samples = 1`` and no
training loss, so nothing un-noised about its data reaches the hub.

Partial uploads (usplit, ulatdec, udec). The clip applies to what is uploaded: a usplit
client reporting encoder + bottleneck clips those two together, a udec client clips its
decoder. The sensitivity stays C per round whatever a client uploads, because the bound is on
the client's whole contribution to all segment sums. Personal segments never leave the
client, so DP says nothing about them and nothing is needed for them: they are not released.

Lossy upload codecs. The clip comes first (before any compression), and under central DP the
hub clips again after decoding, so the bound C holds for what is aggregated even when a codec
(int8 rounding, top-k with error feedback, whose residual carries earlier rounds' values)
makes a decoded update slightly longer. Under local DP the noise is added before compression:
the compressed message is a function of the noised delta only, so compression is
post-processing and spends no privacy; an error-feedback residual must be formed from the
noised delta, never from the raw one.

Accounting. The (epsilon, delta) spent comes from `dp-accounting`'s RDP accountant: a round
released with at least one report is one Gaussian mechanism of multiplier Z (every enrolled
client may take part in every round: no amplification by sampling is claimed, since the
participants are not chosen secretly); a round closed with no report releases nothing. Under
local DP the figure is each client's guarantee against the hub and anyone downstream. With
replace-one adjacency (one client's data swapped for other data) the sensitivity is 2C and
the same noise gives the epsilon of multiplier Z / 2.
"""

from .settings import (
    PRIVACY_MODES,
    PrivacyReport,
    PrivacyRound,
    PrivacySettings,
    privacy_from_options,
)

__all__ = ["PRIVACY_MODES", "PrivacyReport", "PrivacyRound", "PrivacySettings",
           "privacy_from_options"]
