"""Prepaid billing for LiteLLM: a callback that reserves before each call and commits or releases after it.

In a LiteLLM proxy's ``config.yaml``::

    litellm_settings:
      callbacks: tollway_billing.billing   # tollway_billing.py beside config.yaml

with ``tollway_billing.py``::

    import os
    from tollway.integrations.litellm import TollwayBilling

    billing = TollwayBilling(os.environ["BILLING_URL"], os.environ["BILLING_TOKEN"],
                             account_from="metadata:tollway_account")

In a Python app: ``litellm.callbacks = [billing]``, then ``await litellm.acompletion(...)``.
:mod:`tollway.integrations.litellm.callback` says what happens to each call; the README's "Use
with LiteLLM" section shows the whole setup. Needs ``pip install 'tollway[litellm]'``.
"""

from tollway.integrations.litellm.callback import MAX_OUTPUT_TOKENS_DEFAULT, BillingRefused, TollwayBilling
from tollway.integrations.litellm.policy import AccountSource, ConfigurationError

__all__ = ["MAX_OUTPUT_TOKENS_DEFAULT", "AccountSource", "BillingRefused", "ConfigurationError", "TollwayBilling"]
