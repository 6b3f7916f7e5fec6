//go:build tools

// Package tools pins the helm command the ShCR test environment builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
