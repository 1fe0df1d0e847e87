.PHONY: test quickstart generate
test:        ## the README's test command
	hack/test.sh
quickstart:  ## the README's first command
	hack/quickstart.sh
generate:    ## regenerate crds/, docs/api.md, the dashboard, and the chart's copies of them
	.venv/bin/python hack/gen-crds.py
	hack/sync-chart.sh
