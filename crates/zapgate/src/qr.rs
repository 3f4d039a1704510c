//! QR codes as PNG images: black modules on white, a 4-module quiet zone, at least
//! 256 pixels wide, grayscale.

use base64::Engine as _;
use qrcode::{Color, EcLevel, QrCode};

const QUIET_ZONE: usize = 4;
const MIN_SIDE_PX: usize = 256;

/// The PNG of `value`'s QR code; `None` if `value` is too long for one.
pub fn png(value: &str) -> Option<Vec<u8>> {
    let code = QrCode::with_error_correction_level(value.as_bytes(), EcLevel::L).ok()?;
    let modules = code.width();
    let colors = code.to_colors();
    let side_modules = modules + 2 * QUIET_ZONE;
    let scale = MIN_SIDE_PX.div_ceil(side_modules).max(1);
    let side = side_modules * scale;

    let mut pixels = vec![0xFFu8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == Color::Dark {
            let (mx, my) = (i % modules + QUIET_ZONE, i / modules + QUIET_ZONE);
            for y in my * scale..(my + 1) * scale {
                pixels[y * side + mx * scale..y * side + (mx + 1) * scale].fill(0);
            }
        }
    }

    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .expect("writing to a Vec cannot fail");
    writer
        .write_image_data(&pixels)
        .expect("writing to a Vec cannot fail");
    writer.finish().expect("writing to a Vec cannot fail");
    Some(out)
}

/// `data:image/png;base64,...`, as Z-API's `/qr-code/image` returns it.
pub fn png_data_url(value: &str) -> Option<String> {
    let png = png(value)?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_too_long_for_any_qr_code_is_refused_not_a_panic() {
        assert!(super::png(&"x".repeat(8000)).is_none());
        let png = super::png("2@ref,noise,identity,secret,1").unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
