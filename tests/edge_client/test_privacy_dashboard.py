"""The dashboard's round line under differential privacy (and unchanged without it)."""

from feddiffuse.edge_client.tui.screens.dashboard import privacy_text
from feddiffuse.shared.privacy import PrivacySettings
from feddiffuse.shared.privacy.accountant import privacy_report


def test_round_line_shows_epsilon_spent_and_the_budget():
    assert privacy_text(None) == ""
    settings = PrivacySettings(mode="central", clip=1.0, noise_multiplier=1.0, delta=1e-5,
                               epsilon_budget=8.0)
    text = privacy_text(privacy_report(settings, [1]))
    assert text == "; privacy spent: epsilon 4.73 of 8 (central DP, delta 1e-05)"
    no_budget = settings.model_copy(update={"epsilon_budget": None})
    assert privacy_text(privacy_report(no_budget, [])) == (
        "; privacy spent: epsilon 0 (central DP, delta 1e-05)")
