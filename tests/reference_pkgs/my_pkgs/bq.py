"""The reference README's programmatic configuration (the URL comes from the environment)."""

import beanflow as bq

config = bq.Config(
    PROCESSOR_PACKAGES=["my_pkgs.processors", "my_pkgs.files"],
    BATCH_SIZE=10,
)
app = bq.BeanQueue(config=config)
