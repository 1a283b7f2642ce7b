"""Running kiln beyond one checkout: flow-run workspaces recorded as DVC experiments, lineage on registered models,
rebuilding a registered version, and the service stack of a team server. No stage imports this package."""
