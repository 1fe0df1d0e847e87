.PHONY: test quickstart generate
test:        ## the README's test command
	hack/test.sh
quickstart:  ## the README's first command
	hack/quickstart.sh
generate:    ## regenerate crds/ and docs/api.md from the API models
	.venv/bin/python hack/gen-crds.py
