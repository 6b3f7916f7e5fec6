//go:build tools

// Package tools pins OpenTofu's `tofu` command, which the ShCR test environment builds to check
// the Terraform modules under terraform/ (fmt, init without a backend, validate).
package tools

import _ "github.com/opentofu/opentofu/cmd/tofu"
