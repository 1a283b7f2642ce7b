"""`kiln`, the project's command line (cli.main); it drives the stages (tasks/), the flow (flows/) and the platform
(kiln/platform/), and none of them imports it."""
