//! Model import (Hugging Face).
