//go:build tools

// Package tools pins local-kms, the AWS KMS protocol emulator the ShCR test environment builds.
package tools

import _ "github.com/nsmithuk/local-kms"
